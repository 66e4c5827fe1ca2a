"""What a stage does before its work: read its params as DVC reads them, hold the workspace (one run per
workspace; torchrun's workers inherit the hold), and claim its GPUs before CUDA starts."""

from __future__ import annotations

from pipeline.core.config import Params
from pipeline.core.device import take_gpus
from pipeline.core.params import load_params
from pipeline.core.workspace import hold_workspace


def start_stage(stage: str, params_path: str, gpus: int = 0) -> Params:
    """The params of `stage` (a module of pipeline), once the workspace is held and `gpus` GPUs (on a GPU
    host) are this run's alone."""
    params = load_params(params_path)
    hold_workspace(f"python -m pipeline.{stage}")
    if gpus:
        take_gpus(gpus)
    return params
