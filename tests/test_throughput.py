"""pipeline/throughput.py: the chunked loss, FLOPs and MFU, the memory estimate and preflight."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.common import PipelineError
from pipeline.throughput import chunked_cross_entropy, estimate_memory, flops_per_token, preflight

GIB = 1024**3


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_chunked_cross_entropy_matches_torch_with_gradients(chunk):
    torch.manual_seed(0)
    n, d, vocab, padded = 53, 16, 100, 128
    hidden = torch.randn(n, d, requires_grad=True)
    weight = torch.randn(padded, d, requires_grad=True)
    targets = torch.randint(0, vocab, (n,))
    targets[[3, 10]] = -100
    total, count = chunked_cross_entropy(hidden, weight, targets, vocab, chunk)
    (total * 0.5).backward()
    h, w = hidden.detach().requires_grad_(), weight.detach().clone().requires_grad_()
    reference = F.cross_entropy((h @ w.t())[:, :vocab], targets, ignore_index=-100, reduction="sum")
    (reference * 0.5).backward()
    assert count == n - 2
    assert total.item() == pytest.approx(reference.item(), rel=1e-6)
    assert torch.allclose(hidden.grad, h.grad, atol=1e-5)
    assert torch.allclose(weight.grad, w.grad, atol=1e-5)
    assert weight.grad[vocab:].abs().max() == 0  # padding rows take no part


def test_chunked_cross_entropy_without_gradients():
    hidden, weight = torch.randn(5, 4), torch.randn(10, 4)
    targets = torch.tensor([1, 2, 3, 4, 5])
    with torch.no_grad():
        total, _ = chunked_cross_entropy(hidden, weight, targets, 10, 2)
    reference = F.cross_entropy(hidden @ weight.t(), targets, reduction="sum")
    assert total.item() == pytest.approx(reference.item(), rel=1e-6)


def test_flops_per_token_is_nanogpts_estimate():
    # GPT-2 124M without position embeddings: 124,439,808 - 786,432 parameters, block 1024
    n = 124_439_808 - 1024 * 768
    assert flops_per_token(n, 12, 768, 1024) == 6 * n + 12 * 12 * 768 * 1024
    assert flops_per_token(n, 12, 768, 1024) == pytest.approx(8.4e8, rel=0.02)


def gpt2_xl(batch: int, checkpointing: bool = False, trainable: int | None = None):
    n = 1_557_611_200
    return estimate_memory(n, n if trainable is None else trainable, 48, 1600, 25, 50257, batch, 1024, "bf16",
                           checkpointing, "sdpa")


def test_gpt2_xl_full_fine_tuning_needs_more_than_24_gb_and_fits_40():
    estimate = gpt2_xl(batch=1)
    assert 18 * 1_557_611_200 <= estimate.static < 19 * 1_557_611_200
    assert 24e9 < estimate.total < 40e9


def test_checkpointing_lora_and_the_chunked_loss_shrink_the_estimate():
    full = gpt2_xl(batch=8)
    assert gpt2_xl(batch=8, checkpointing=True).activations < full.activations / 10
    assert gpt2_xl(batch=8, trainable=4_000_000).static < full.static / 4
    chunked = estimate_memory(1_557_611_200, 1_557_611_200, 48, 1600, 25, 50257, 8, 1024, "bf16", False, "sdpa", 1024)
    assert chunked.logits < full.logits / 4


def test_preflight_fails_fast_with_what_to_change(monkeypatch):
    monkeypatch.setattr("pipeline.throughput.free_memory", lambda: (24 * GIB, "NVIDIA A10 (test)"))
    with pytest.raises(PipelineError) as error:
        preflight(gpt2_xl(batch=4), 4, 32, False, False, False)
    message = str(error.value)
    assert "training needs about" in message and "NVIDIA A10 (test) has 24.0 GiB free" in message
    assert "per_device_train_batch_size: 2 with gradient_accumulation_steps: 64" in message
    assert "gradient_checkpointing: true" in message and "lora.enabled: true" in message
    # GPT-2 124M at batch 32 x 1024: the logits dominate, so the chunked loss is suggested too
    gpt2 = estimate_memory(124_439_808, 124_439_808, 12, 768, 12, 50257, 32, 1024, "bf16", False, "sdpa")
    with pytest.raises(PipelineError, match="loss_chunk_tokens: 1024"):
        preflight(gpt2, 32, 1, False, False, False)
    monkeypatch.setattr("pipeline.throughput.free_memory", lambda: (80 * GIB, "H100 (test)"))
    preflight(gpt2_xl(batch=1), 1, 128, False, False)  # fits: no error


class FakeClock:
    """perf_counter for pipeline.throughput: time moves only when the fake model runs."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


class AttentionModel(torch.nn.Module):
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
    import pipeline.throughput as throughput

    clock = FakeClock()
    monkeypatch.setattr(throughput, "time", clock)
    monkeypatch.setattr(throughput, "available_attention", lambda: ["sdpa", "eager"])
    model = AttentionModel(clock, cost, bursts).eval()  # calls 0, 1: warm-ups; then sdpa, eager, sdpa, eager
    best, timings = throughput.fastest_attention(model, {"x": torch.ones(1)}, "fp32")
    assert best == expected and model.name == expected
    assert timings == pytest.approx(cost)
    assert model.weight.grad is None and not model.training
