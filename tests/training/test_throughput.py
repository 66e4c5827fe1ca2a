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
