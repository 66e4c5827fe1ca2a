"""Text lengths in tokens, as metrics/data.json reports them (percentiles) and the doc_lengths plot draws
them (a histogram per split)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.core.errors import PipelineError

if TYPE_CHECKING:
    import numpy as np

HISTOGRAM_EDGES = [2**k for k in range(4, 17)]  # lengths in tokens: 16, 32, ... 65536, more


def length_stats(lengths: np.ndarray) -> tuple[dict, list[int]]:
    """Length percentiles (tokens) and histogram counts over HISTOGRAM_EDGES."""
    import numpy as np

    if not len(lengths):
        return {}, [0] * (len(HISTOGRAM_EDGES) + 1)
    p50, p90, p99 = np.percentile(lengths, [50, 90, 99])
    counts = np.bincount(np.searchsorted(HISTOGRAM_EDGES, lengths), minlength=len(HISTOGRAM_EDGES) + 1)
    return ({"length_p50": float(p50), "length_p90": float(p90), "length_p99": float(p99),
             "length_max": int(lengths.max())}, counts.tolist())


def histogram_rows(split: str, counts: list[int]) -> list[dict]:
    """One row per length bin; bin_index keeps the plot's bins in order (.dvc/plots/lengths.json)."""
    return [{"split": split, "bin": str(edge) if edge else f">{HISTOGRAM_EDGES[-1]}", "bin_index": i, "documents": n}
            for i, (edge, n) in enumerate(zip([*HISTOGRAM_EDGES, None], counts, strict=True))]


def check_block_size(block_size: int, max_positions: int | None) -> None:
    """A block fits the model's context."""
    if max_positions is not None and block_size > max_positions:
        raise PipelineError(f"params: preprocess.block_size ({block_size}) exceeds the model's n_positions "
                            f"({max_positions}); set block_size to at most {max_positions}")
