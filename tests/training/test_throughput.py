"""pipeline/training/throughput.py: FLOPs per token, and the steady figure beside the whole run."""

from __future__ import annotations

import pytest

from pipeline.training.throughput import ThroughputMeter, flops_per_token, warmup_steps


def test_flops_per_token_is_nanogpts_estimate():
    # GPT-2 124M without position embeddings: 124,439,808 - 786,432 parameters, block 1024
    n = 124_439_808 - 1024 * 768
    assert flops_per_token(n, 12, 768, 1024) == 6 * n + 12 * 12 * 768 * 1024
    assert flops_per_token(n, 12, 768, 1024) == pytest.approx(8.4e8, rel=0.02)


def run(meter: ThroughputMeter, events: list[tuple]) -> None:
    """Feed the meter as the Trainer's callbacks would: ("log", step, time), ("eval", seconds), ("save",)."""
    meter.begin(0, 0.0)
    for event in events:
        if event[0] == "log":
            meter.log(event[1], event[2])
        elif event[0] == "eval":
            meter.exclude(event[1])
        else:
            meter.saved()


def test_the_steady_figure_leaves_out_warm_up_and_checkpoints_and_takes_out_evaluations():
    # 100 tokens a step. Step 1 compiles (50 s); every later step takes 1 s; an evaluation of 7 s after
    # step 20; a checkpoint (3 s) after step 30
    meter = ThroughputMeter(tokens_per_step=100, flops_per_token=6.0, peak_flops=1200.0, warmup=10)
    run(meter, [("log", 1, 50.0), ("log", 10, 59.0), ("log", 20, 69.0), ("eval", 7.0), ("log", 30, 86.0),
                ("save",), ("log", 40, 99.0), ("log", 50, 109.0)])
    steady = meter.steady()
    # kept: 10->20, 20->30 (the evaluation taken out), 40->50; not 0->1, 1->10 (warm-up) nor 30->40 (save)
    assert steady["steady_steps"] == 30
    assert steady["steady_tokens_per_second"] == pytest.approx(100.0)
    assert steady["steady_mfu"] == pytest.approx(100.0 * 6.0 / 1200.0)
    whole = 50 * 100 / (109.0 - 7.0)
    assert whole < 0.5 * steady["steady_tokens_per_second"]  # what the whole-run figure would have said


def test_a_resumed_run_warms_up_again_from_its_resume_step():
    meter = ThroughputMeter(tokens_per_step=10, flops_per_token=1.0, peak_flops=1.0, warmup=5)
    meter.begin(100, 0.0)
    meter.log(101, 30.0)  # the first step after resuming: compile and load
    meter.log(105, 34.0)
    meter.log(110, 39.0)
    assert meter.steady()["steady_steps"] == 5 and meter.steady()["steady_tokens_per_second"] == pytest.approx(10.0)


def test_no_steady_interval_is_none_not_a_guess():
    meter = ThroughputMeter(tokens_per_step=10, flops_per_token=1.0, peak_flops=1.0, warmup=3)
    run(meter, [("log", 1, 5.0), ("log", 2, 6.0)])
    assert meter.steady()["steady_tokens_per_second"] is None and meter.steady()["steady_mfu"] is None


def test_each_interval_is_logged_with_its_rate():
    meter = ThroughputMeter(tokens_per_step=10, flops_per_token=2.0, peak_flops=100.0)
    meter.begin(0, 0.0)
    assert meter.log(0, 1.0) == {}  # no step ran
    meter.exclude(3.0)
    assert meter.log(4, 5.0) == {"perf/tokens_per_second": pytest.approx(40 / 1.0), "perf/mfu": pytest.approx(0.8)}


@pytest.mark.parametrize("planned, expected", [(1, 1), (8, 1), (60, 6), (109, 10), (10_000, 10)])
def test_warm_up_is_a_tenth_of_the_run_between_1_and_10_steps(planned, expected):
    assert warmup_steps(planned) == expected


# --- MFU per device, and the FLOPs a run really does ------------------------------------------------

def test_mfu_is_per_device_beside_the_global_tokens_per_second():
    # 2 processes: 100 tokens a step over all of them, each device with a peak of 600 FLOP/s
    meter = ThroughputMeter(tokens_per_step=100, flops_per_token=6.0, peak_flops=600.0, devices=2)
    meter.begin(0, 0.0)
    meter.log(1, 10.0)
    assert meter.log(11, 20.0) == {"perf/tokens_per_second": pytest.approx(100.0),
                                   "perf/mfu": pytest.approx(100.0 * 6.0 / (2 * 600.0))}
    assert meter.steady()["steady_mfu"] == pytest.approx(0.5) and meter.mfu(200.0) == pytest.approx(1.0)


def tiny_gpt2(n_layer: int = 2):
    from transformers import GPT2Config, GPT2LMHeadModel

    from pipeline.training.loss import pad_vocab

    model = GPT2LMHeadModel(GPT2Config(n_layer=n_layer, n_embd=32, n_head=2, n_positions=64))
    return model, pad_vocab(model, 64)


def meter_of(model, vocab: int, monkeypatch, world: int = 1) -> ThroughputMeter:
    """The train stage's meter of `model` at block 64, the device's peak not measured."""
    import pipeline.training.throughput as throughput
    from pipeline.training.plan import Plan

    monkeypatch.setattr(throughput, "peak_flops", lambda precision: (1e12, "test"))
    return throughput.run_meter(model, vocab, Plan("fp32", "cpu", world, 64, 10, 4 * world, False))


def weights(model, vocab: int) -> int:
    """Every weight a product reads (GPT-2: all but the position embeddings), padding rows not counted."""
    from pipeline.training.model import count_parameters

    return count_parameters(model, vocab)[0] - model.transformer.wpe.weight.numel()


def test_full_fine_tuning_counts_nanogpts_6n_and_the_devices_of_the_run(monkeypatch):
    model, vocab = tiny_gpt2()
    meter = meter_of(model, vocab, monkeypatch, world=2)
    assert meter.flops_per_token == 6 * weights(model, vocab) + 12 * 2 * 32 * 64
    assert meter.devices == 2


def test_lora_counts_the_weight_gradients_of_its_adapters_only(monkeypatch):
    """Forward and input gradient run through every weight (2N + 2N), weight gradients only for the
    adapters (2A): not nanoGPT's 6N, which would overstate a LoRA run's MFU by up to 1.5x."""
    from pipeline.training.model import add_lora
    from tests.support import project_section

    model, vocab = tiny_gpt2()
    model = add_lora(model, project_section("train.lora", enabled=True, r=4))
    n, adapters = weights(model, vocab), sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert meter_of(model, vocab, monkeypatch).flops_per_token == 4 * n + 2 * adapters + 12 * 2 * 32 * 64


def test_frozen_blocks_below_the_trained_ones_get_no_backward(monkeypatch):
    """Embeddings and the first of 3 blocks frozen: the backward stops at block 2 (no input gradient
    through block 1, nor through its attention), and the output layer (tied to the frozen embeddings)
    gets no weight gradient."""
    from pipeline.training.model import freeze, transformer_layers

    model, vocab = tiny_gpt2(n_layer=3)
    freeze(model, embeddings=True, layers=1)
    n, block = weights(model, vocab), sum(p.numel() for p in transformer_layers(model)[0].parameters())
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    expected = 2 * n + 2 * (n - block) + 2 * trained + 4 * 3 * 32 * 64 + 8 * 2 * 32 * 64
    assert meter_of(model, vocab, monkeypatch).flops_per_token == expected


# --- steady intervals: no recompile, no short step --------------------------------------------------

def test_an_interval_holding_an_epochs_short_last_step_is_left_out():
    # every 10th step is an epoch's last, on a smaller batch (a recompile under torch.compile, fewer tokens)
    meter = ThroughputMeter(tokens_per_step=100, flops_per_token=1.0, peak_flops=1.0, warmup=1, short_every=10)
    run(meter, [("log", 1, 5.0), ("log", 5, 9.0), ("log", 9, 13.0), ("log", 11, 60.0), ("log", 15, 64.0)])
    steady = meter.steady()
    assert steady["steady_steps"] == 12 and steady["steady_tokens_per_second"] == pytest.approx(100.0)


@pytest.mark.parametrize("blocks, batch, world, accumulation, short_every", [
    (40, 4, 1, 1, 0),    # 10 full batches an epoch
    (42, 4, 1, 1, 11),   # the 11th batch holds 2 blocks: a new shape, fewer tokens
    (40, 4, 1, 3, 4),    # 10 batches, accumulation 3: the 4th step has 1 batch
    (42, 4, 2, 1, 0),    # 2 processes: accelerate tops the last batch up with repeated blocks (even_batches)
    (48, 4, 2, 2, 0),    # 6 batches a process, accumulation 2: 3 full steps
    (48, 4, 2, 4, 2),    # accumulation 4: 2 steps, the 2nd of 2 batches
])
def test_the_plan_knows_which_steps_are_short(blocks, batch, world, accumulation, short_every, monkeypatch):
    from pipeline.training.plan import make_plan
    from tests.support import project_section

    monkeypatch.setenv("WORLD_SIZE", str(world))
    t = project_section("train", per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
                        max_steps=-1, num_train_epochs=3, warmup_steps=0)
    assert make_plan(t, blocks, 64).short_every == short_every


# --- the device's peak ------------------------------------------------------------------------------

@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756), ("NVIDIA H100 NVL", 835), ("NVIDIA H200", 989),
    ("NVIDIA H200 NVL", 835), ("NVIDIA A100-SXM4-80GB", 312), ("NVIDIA A100 80GB PCIe", 312), ("NVIDIA L40S", 362),
    ("NVIDIA L40", 181), ("NVIDIA L4", 121), ("NVIDIA A10", 125), ("NVIDIA A10G", 125),
    ("NVIDIA GeForce RTX 4090", 165), ("NVIDIA GeForce RTX 3090", 71), ("Tesla T4", 65),
])
def test_the_peak_table_matches_device_names_by_their_tokens(name, tflops, monkeypatch):
    import torch

    from pipeline.training.throughput import peak_flops

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *device: name)
    flops, source = peak_flops("fp16" if name == "Tesla T4" else "bf16")
    assert flops == tflops * 1e12 and "data sheet" in source and name in source


@pytest.mark.parametrize("name", ["NVIDIA B200", "Tesla V100-SXM2-16GB", "NVIDIA H100 80GB HBM3 (fp32)"])
def test_a_device_the_table_does_not_know_is_named_as_estimated(name, monkeypatch):
    import torch

    import pipeline.training.throughput as throughput

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *device: name.removesuffix(" (fp32)"))
    monkeypatch.setattr(throughput, "measured_matmul_flops", lambda precision: 123e12)
    flops, source = throughput.peak_flops("fp32" if name.endswith("(fp32)") else "bf16")
    assert flops == 123e12 and "estimated" in source and "data sheet" not in source


def test_the_measured_peak_synchronises_before_its_clock_at_a_gpus_size(monkeypatch):
    """On CUDA the warm-up product is finished before the clock starts (else its time, and the queue it
    fills, count in the measure), at 8192^3, large enough to keep a GPU busy."""
    import time

    import torch

    from pipeline.training.throughput import measured_matmul_flops

    events, sizes, now = [], [], [0.0]

    class Matrix:
        def __matmul__(self, other):
            events.append("matmul")
            return self

    def clock():
        events.append("clock")
        now[0] += 0.1
        return now[0]

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *device: events.append("sync"))
    monkeypatch.setattr(torch, "randn", lambda *shape, **kwargs: sizes.append(shape) or Matrix())
    monkeypatch.setattr(time, "perf_counter", clock)
    measured_matmul_flops("bf16", seconds=0.5)
    assert sizes == [(8192, 8192)] * 2
    assert events[:3] == ["matmul", "sync", "clock"] and events[-2:] == ["sync", "clock"]
