"""pipeline/training/loss.py: the model's own loss over a padded vocabulary, and the evaluation's chunked sum."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.training.loss import causal_lm_loss, pad_vocab, summed_nll


def tiny_gpt2(vocab: int = 100, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, n_positions=32, vocab_size=vocab))
    model.loss_type = "ForCausalLM"
    return model.eval()


def reference(logits, labels, vocab):
    """Plain next-token cross-entropy over the real vocabulary, summed."""
    return F.cross_entropy(logits[:, :-1, :vocab].reshape(-1, vocab), labels[:, 1:].reshape(-1), reduction="sum",
                           ignore_index=-100)


def test_the_loss_leaves_the_padding_rows_out_with_gradients():
    torch.manual_seed(0)
    vocab, padded = 100, 128
    logits = torch.randn(2, 9, padded, requires_grad=True)
    labels = torch.randint(0, vocab, (2, 9))
    labels[0, 3] = -100
    loss = causal_lm_loss(vocab)(logits, labels, padded, num_items_in_batch=torch.tensor(13))
    loss.backward()
    expected = reference(logits.detach(), labels, vocab) / 13
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert logits.grad[..., vocab:].abs().max() == 0  # the padding rows take no part
    mean = causal_lm_loss(vocab)(logits.detach(), labels, padded)  # no token count: the mean over targets
    assert mean.item() == pytest.approx(reference(logits.detach(), labels, vocab).item() / 15, rel=1e-6)


def test_padding_the_vocabulary_changes_neither_the_model_loss_nor_its_gradients():
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    plain, padded = tiny_gpt2(), tiny_gpt2()
    padded.loss_function = causal_lm_loss(pad_vocab(padded, 64))
    plain.loss_function = causal_lm_loss(100)
    assert padded.get_input_embeddings().weight.shape[0] == 128
    losses = [m(input_ids=ids, labels=ids).loss for m in (plain, padded)]
    for loss in losses:
        loss.backward()
    assert losses[1].item() == pytest.approx(losses[0].item(), rel=1e-6)
    grads = [m.transformer.h[0].mlp.c_fc.weight.grad for m in (plain, padded)]
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


@pytest.mark.parametrize("chunk", [1, 7, 1024])
def test_evaluation_sum_in_chunks_equals_the_full_logits(chunk):
    model = tiny_gpt2()
    vocab = pad_vocab(model, 64)
    ids = torch.randint(0, 100, (3, 10), generator=torch.Generator().manual_seed(2))
    labels = ids.clone()
    labels[1, :4] = -100
    with torch.no_grad():
        total, count = summed_nll(model, ids, labels, vocab, chunk=chunk)
        expected = reference(model(input_ids=ids).logits, labels, vocab)
    assert count == 3 * 9 - 3
    assert total.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_evaluation_sum_equals_the_full_logits_padded_or_not(precision):
    """summed_nll in fp32 and under bf16 autocast (the evaluate stage's) against the plain cross-entropy
    of the logits the model returns, on the model as saved and with its vocabulary padded."""
    ids = torch.randint(0, 100, (3, 10), generator=torch.Generator().manual_seed(3))
    labels = ids.clone()
    labels[2, 6:] = -100
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    plain, padded = tiny_gpt2(), tiny_gpt2()
    pad_vocab(padded, 64)
    with torch.no_grad(), autocast:
        expected = reference(plain(input_ids=ids).logits.float(), labels, 100)
        totals = [summed_nll(m, ids, labels, 100, chunk=7)[0] for m in (plain, padded)]
    tolerance = 1e-5 if precision == "fp32" else 1e-2  # bf16: the logits rounded to 8 bits of mantissa
    assert totals[0].item() == pytest.approx(expected.item(), rel=tolerance)
    assert totals[1].item() == pytest.approx(totals[0].item(), rel=tolerance)


def test_evaluation_casts_the_padded_output_matrix_once():
    """Under bf16 autocast the output matrix is cast once per batch, whole (its rows a multiple of 64), not
    sliced to the real vocabulary and cast again for every chunk; the padding's logits are dropped."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Casts(TorchDispatchMode):
        seen: list = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._to_copy.default and args[0].numel() in (100 * 16, 128 * 16):
                self.seen.append(tuple(args[0].shape))
            return func(*args, **(kwargs or {}))

    model = tiny_gpt2()
    vocab = pad_vocab(model, 64)
    ids = torch.randint(0, 100, (3, 10), generator=torch.Generator().manual_seed(4))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), Casts() as casts:
        summed_nll(model, ids, ids, vocab, chunk=7)  # 27 predicted tokens: 4 chunks
    assert casts.seen == [(128, 16)]
