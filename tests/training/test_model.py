"""pipeline/training/model.py: the model as it trains, with the dropout asked for."""

from __future__ import annotations

from dataclasses import replace

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
