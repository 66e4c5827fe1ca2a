"""pipeline/training/plan.py and attention.py, the run's decisions: attention never measured at the training
batch (never at all on CUDA), the compile decision, the steps planned."""

from __future__ import annotations

import pytest
import torch

import pipeline.training.attention as attention_module
import pipeline.training.plan as plan_module
from pipeline.training.attention import Attention, choose_attention
from pipeline.training.plan import Plan, make_plan, use_compile
from tests.support import project_section


def train_params(**changes):
    return project_section("train", **changes)


class Recorder(torch.nn.Module):
    """A tiny GPT-2 that records the batch size of every forward pass (or refuses to run at all)."""

    def __init__(self, runnable: bool = True, dropout: float = 0.1):
        from transformers import GPT2Config, GPT2LMHeadModel

        super().__init__()
        torch.manual_seed(0)
        self.inner = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=128,
                                                resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout))
        self.config, self.base_model_prefix, self.transformer = self.inner.config, "transformer", self.inner.transformer
        self.runnable, self.batches, self.implementation = runnable, [], None

    def get_output_embeddings(self):
        return self.inner.get_output_embeddings()

    def set_attn_implementation(self, name: str) -> None:
        self.implementation = name
        self.inner.set_attn_implementation(name)

    def forward(self, input_ids, labels=None, **kwargs):
        assert self.runnable, "the attention choice ran the model"
        self.batches.append(input_ids.shape[0])
        return self.inner(input_ids=input_ids, labels=labels, **kwargs)


def blocks(n: int = 16, length: int = 64) -> list[dict]:
    return [{"input_ids": list(range(i, i + length)), "labels": list(range(i, i + length))} for i in range(n)]


def cuda_plan(precision: str = "bf16", batch: int = 16) -> tuple:
    return (train_params(per_device_train_batch_size=batch), Plan(precision, "cuda", 1, 64, 100, batch, False))


@pytest.mark.parametrize("flash_installed, precision, expected", [
    (False, "bf16", "sdpa"), (True, "bf16", "flash_attention_2"), (True, "fp16", "flash_attention_2"),
    (True, "fp32", "sdpa"),  # flash-attn has no fp32 kernels
])
def test_auto_attention_on_cuda_runs_nothing(monkeypatch, flash_installed, precision, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(attention_module, "flash_attention_installed", lambda: flash_installed)
    model = Recorder(runnable=False)
    t, run = cuda_plan(precision)
    monkeypatch.setattr(model, "set_attn_implementation", lambda name: setattr(model, "implementation", name))
    chosen = choose_attention(model, t, run, blocks(), resumed=None)
    assert chosen == Attention(expected) and model.implementation == expected and model.batches == []


def test_on_a_cpu_auto_times_one_block_not_the_training_batch():
    model = Recorder().eval()  # as from_pretrained hands it over
    t = train_params(per_device_train_batch_size=8)
    chosen = choose_attention(model, t, Plan("fp32", "cpu", 1, 64, 100, 8, False), blocks(), resumed=None)
    assert model.batches and set(model.batches) == {1}  # warm-ups and two timed rounds, each on one block
    assert chosen.implementation in ("sdpa", "eager") and set(chosen.timings_ms) == {"sdpa", "eager"}
    assert model.implementation == chosen.implementation and not model.inner.training  # mode restored


def test_on_a_cpu_auto_does_not_time_eager_when_even_one_block_would_raise_the_peak():
    # no dropout: sdpa's fused CPU kernel keeps no score matrix, and the training batch is one block
    model = Recorder(runnable=False, dropout=0.0)
    t = train_params(per_device_train_batch_size=1, dropout=0.0)
    assert choose_attention(model, t, Plan("fp32", "cpu", 1, 64, 100, 1, False), blocks(), None) == \
        Attention("sdpa")


def test_a_resumed_run_keeps_its_attention_without_measuring(monkeypatch):
    model = Recorder(runnable=False)
    t, run = cuda_plan()
    monkeypatch.setattr(model, "set_attn_implementation", lambda name: setattr(model, "implementation", name))
    assert choose_attention(model, t, run, blocks(), resumed="eager") == Attention("eager")


class FakeClock:
    """perf_counter for pipeline.training.plan: time moves only when the fake model runs."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


class TimedModel(torch.nn.Module):
    """A step costs `cost[implementation]` fake seconds, plus `burst` on the calls listed in `bursts`."""

    def __init__(self, clock: FakeClock, cost: dict[str, float], bursts: set[int], burst: float = 5.0):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(1))
        self.clock, self.cost, self.bursts, self.burst, self.calls, self.name = clock, cost, bursts, burst, 0, None

    def set_attn_implementation(self, name: str) -> None:
        self.name = name

    def forward(self, x):
        assert self.training, "the probe must time training steps (dropout on)"
        self.clock.now += self.cost[self.name] + (self.burst if self.calls in self.bursts else 0.0)
        self.calls += 1
        return type("Out", (), {"loss": (self.weight * x).sum()})()


@pytest.mark.parametrize("cost, bursts, expected", [
    ({"sdpa": 1.0, "eager": 0.8}, {3}, "eager"),   # eager's first timed call hit by load: its second counts
    ({"sdpa": 1.0, "eager": 0.8}, {2}, "eager"),   # sdpa's: eager still wins
    ({"sdpa": 1.0, "eager": 0.95}, set(), "sdpa"),  # within 10%: stay on PyTorch's default
    ({"sdpa": 1.0, "eager": 2.0}, {3}, "sdpa"),
])
def test_attention_probe_takes_each_ones_best_round(monkeypatch, cost, bursts, expected):
    clock = FakeClock()
    monkeypatch.setattr(attention_module, "time", clock)
    model = TimedModel(clock, cost, bursts).eval()  # calls 0, 1: warm-ups; then sdpa, eager, sdpa, eager
    best, timings = attention_module.fastest_attention(model, {"x": torch.ones(1)}, "fp32")
    assert best == expected
    assert timings == pytest.approx(cost)
    assert model.weight.grad is None and not model.training


@pytest.mark.parametrize("requested, device, tokens, expected", [
    ("auto", "cuda", 20_000_000, True), ("auto", "cuda", 1_000_000, False), ("auto", "cpu", 10**9, False),
    (True, "cpu", 0, True), (False, "cuda", 10**9, False),
])
def test_compile_auto_is_on_for_long_cuda_runs_only(requested, device, tokens, expected):
    assert use_compile(requested, device, tokens)[0] is expected


@pytest.mark.parametrize("num_train_epochs, max_steps, expected", [(3.0, -1, 21), (1.5, -1, 11), (3.0, 5, 5)])
def test_planned_steps_count_as_the_trainer_does(num_train_epochs, max_steps, expected):
    # 100 blocks, 8 per batch -> 13 batches an epoch -> 7 optimizer steps with accumulation 2
    t = train_params(num_train_epochs=num_train_epochs, max_steps=max_steps, per_device_train_batch_size=8,
                     gradient_accumulation_steps=2, precision="fp32")
    planned = make_plan(t, train_blocks=100, block_size=64)
    assert planned.steps == expected and planned.effective_batch == 16 and planned.tokens_per_step == 1024


def test_sharding_needs_processes_to_shard_over(monkeypatch):
    from pipeline.core.errors import PipelineError

    t = train_params(sharding="zero3", precision="fp32", torch_compile="auto")
    with pytest.raises(PipelineError, match=r"train.sharding: zero3 splits the training state across processes, and "
                                            r"this run has 1; .*NPROC_PER_NODE=N"):
        make_plan(t, train_blocks=100, block_size=64)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(plan_module, "use_compile", lambda *_: (True, "auto: CUDA, a long run"))
    planned = make_plan(t, train_blocks=100, block_size=64)
    assert planned.sharding == "zero3" and planned.world_size == 2 and not planned.compile  # auto turns it off
