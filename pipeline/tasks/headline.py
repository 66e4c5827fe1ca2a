"""What every task's headline (metrics/summary.json) and summary (the demo's closing lines) share: the
training's speed, memory and minutes."""

from __future__ import annotations


def speed(train: dict) -> dict:
    """Throughput and MFU (the steady figures, after warm-up, without evaluations and saves, or the whole
    run's when the run had no steady part), peak memory and training minutes, rounded."""
    steady = train["steady_tokens_per_second"] is not None
    return {
        "tokens_s": round(train["steady_tokens_per_second"] if steady else train["tokens_per_second"]),
        "mfu": round(train["steady_mfu"] if steady else train["mfu"], 4),
        "peak_gib": round(train["peak_memory_gib"], 2),
        "train_min": round(train["wall_seconds"] / 60, 2),
    }


def rounded(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def training_line(train: dict) -> str:
    """One line of the run: steps, tokens, speed, precision, attention, peak memory."""
    whole = f"{train['tokens_per_second']:,.0f} tokens/s"
    if train["steady_tokens_per_second"] is None:
        speed_text = f"{whole} (MFU {train['mfu']:.1%})"
    else:  # steady: after warm-up, without evaluations and saves
        speed_text = (f"steady {train['steady_tokens_per_second']:,.0f} tokens/s (MFU {train['steady_mfu']:.1%}), "
                      f"whole run {whole}")
    return (f"training: {train['steps']} steps, {train['tokens_seen']:,} tokens, {speed_text}, {train['precision']}, "
            f"{train['attention']} attention, peak memory {train['peak_memory_gib']:.1f} GiB "
            f"({train['peak_memory_kind']})")
