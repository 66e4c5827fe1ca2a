"""pipeline/training/model.py: the model as it trains, with the dropout asked for."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from pipeline.core.config import Params
from pipeline.training.model import dropout_overrides


def test_dropout_override_names_every_dropout_field_of_the_config():
    from transformers import GPT2Config, LlamaConfig

    assert dropout_overrides(GPT2Config(), None) == {}
    assert {"resid_pdrop", "embd_pdrop", "attn_pdrop"} <= set(dropout_overrides(GPT2Config(), 0.0))
    assert dropout_overrides(LlamaConfig(), 0.05) == {"attention_dropout": 0.05}


def test_the_trained_model_is_built_with_the_dropout_asked_for(pipeline_outputs):
    from pipeline.core.params import load_params
    from pipeline.training.model import prepare_model

    params: Params = load_params(pipeline_outputs / "params.yaml")
    base = pipeline_outputs / "models/base"
    model, _ = prepare_model(replace(params.train, dropout=0.0), False, base, 50256)
    rates = {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)}
    assert rates == {0.0} and model.config.attn_pdrop == 0.0
    model, _ = prepare_model(params.train, False, base, 50256)
    assert {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)} == {0.1}  # null keeps the model's


def bf16_step(model, ids):
    """One forward+backward of `model` in bf16 on this CPU, its forward wrapped as accelerate's prepare_model
    wraps it under mixed precision (autocast, then every output cast to fp32), measured with
    PeakTensorMemory: the loss, the bytes the forward's outputs hold when it returns, the step's peak."""
    from accelerate.utils import convert_outputs_to_fp32

    from pipeline.training.memory.peak import PeakTensorMemory

    forward = convert_outputs_to_fp32(torch.autocast("cpu", dtype=torch.bfloat16)(model.forward))
    with PeakTensorMemory(*model.parameters(), ids) as tracked:
        before = tracked.now
        outputs = forward(input_ids=ids, labels=ids)
        held, loss = tracked.now - before, outputs.loss
        del outputs  # as the Trainer's compute_loss returns the loss alone
        loss.backward()
    return loss.item(), held, tracked.peak


def test_a_training_forward_returns_the_loss_without_the_logits(pipeline_outputs):
    """The loss is computed inside the model; accelerate's mixed-precision wrapper then casts every output to
    fp32, the B x T x V logits too, which nothing in training reads. A forward given labels returns none,
    so the forward's outputs hold B x T x V x 4 bytes less, for the same loss; without labels (generation,
    evaluation) the logits are there."""
    from pipeline.core.loading import load_model
    from pipeline.core.params import load_params
    from pipeline.training.loss import causal_lm_loss, pad_vocab
    from pipeline.training.model import prepare_model

    params: Params = load_params(pipeline_outputs / "params.yaml")
    base = pipeline_outputs / "models/base"
    plain = load_model(base, made_by="download", config_overrides={"resid_pdrop": 0.0, "embd_pdrop": 0.0,
                                                                    "attn_pdrop": 0.0})
    plain.loss_type, plain.loss_function = "ForCausalLM", causal_lm_loss(pad_vocab(plain, 64))  # as before
    model, vocab = prepare_model(replace(params.train, dropout=0.0), False, base, 50256)
    ids = torch.randint(0, vocab, (2, 32), generator=torch.Generator().manual_seed(0))
    (plain_loss, plain_held, plain_peak), (loss, held, peak) = bf16_step(plain.train(), ids), bf16_step(model, ids)
    logits_fp32 = 2 * 32 * 50304 * 4
    assert plain_held - held == pytest.approx(logits_fp32, rel=0.01)
    assert peak <= plain_peak  # eager, the peak is the loss's backward, after the outputs are gone: no higher
    assert loss == plain_loss
    with torch.no_grad():
        assert model(input_ids=ids).logits.shape == (2, 32, 50304)


def test_causal_sdpa_only_where_causality_is_the_whole_mask():
    """sdpa without a mask is causal attention and nothing more: a sliding window (Mistral) or layers of
    another kind (local ones) live in the mask transformers builds, so those models keep it."""
    from transformers import GPT2Config, GPT2LMHeadModel, MistralConfig, MistralForCausalLM

    from pipeline.training.model import CAUSAL_SDPA, causal_sdpa, plainly_causal

    assert plainly_causal(GPT2Config()) and plainly_causal(MistralConfig(sliding_window=None))
    assert not plainly_causal(MistralConfig(sliding_window=4096))
    tiny = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
            "num_key_value_heads": 1, "vocab_size": 64}
    sliding = MistralForCausalLM(MistralConfig(sliding_window=8, attn_implementation="sdpa", **tiny))
    causal_sdpa(sliding)
    assert sliding.config._attn_implementation == "sdpa"
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, attn_implementation="sdpa"))
    causal_sdpa(gpt2)
    assert gpt2.config._attn_implementation == CAUSAL_SDPA
