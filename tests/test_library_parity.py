"""Where the pipeline keeps its own code beside a library that does much the same: the figures agree with the
library's, and the library still lacks what the pipeline's own code is kept for (should one of these checks fail
after an upgrade, the library now does it: use it instead)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

from pipeline.tasks.classification.metrics import scores


def random_labels(seed: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Actual and predicted labels of 2-6 classes; the last class is never predicted, and with an even seed
    class 0 is never present."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 7))
    actual, predicted = rng.integers(0, n, 60), rng.integers(0, n - 1, 60)
    if seed % 2 == 0:
        actual[actual == 0] = 1
    return actual, predicted, n


CASES = [random_labels(seed) for seed in range(8)] + [
    (np.array([0, 1, 1, 2]), np.array([0, 1, 1, 2]), 3),  # all right
    (np.array([0, 0, 1]), np.array([1, 1, 0]), 3),  # all wrong; class 2 neither present nor predicted
    (np.array([2, 2, 2]), np.array([2, 0, 2]), 4),  # one class present, two never seen at all
]


@pytest.mark.parametrize(("actual", "predicted", "n"), CASES)
def test_scores_agree_with_scikit_learn(actual, predicted, n):
    ours = scores(actual, predicted, [f"c{i}" for i in range(n)])
    precision, recall, f1, support = precision_recall_fscore_support(actual, predicted, labels=range(n),
                                                                     zero_division=0)
    assert ours["accuracy"] == pytest.approx(accuracy_score(actual, predicted), abs=1e-12)
    assert ours["macro_f1"] == pytest.approx(f1_score(actual, predicted, average="macro", labels=range(n),
                                                      zero_division=0), abs=1e-12)
    for i in range(n):
        got = ours["per_class"][f"c{i}"]
        assert (got["precision"], got["recall"], got["f1"]) == pytest.approx((precision[i], recall[i], f1[i]),
                                                                            abs=1e-12)
        assert got["support"] == support[i]


def test_datasets_encoding_errors_does_not_repair_json(tmp_path):
    """Why pipeline.data.sources repairs UTF-8 itself: datasets' json builder takes encoding_errors and ignores it
    for UTF-8 files, so the bad byte is stored in the Arrow table and reading the record fails later."""
    import datasets

    from pipeline.data.sources import load_raw
    from tests.support import project_section

    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"text": "cr\xe8me"}\n')
    raw = datasets.load_dataset("json", data_files={"train": [str(path)]}, encoding_errors="replace",
                                cache_dir=str(tmp_path / "cache"))
    with pytest.raises(UnicodeDecodeError):
        raw["train"][0]["text"]  # noqa: B018 - the read is the check
    ours, _ = load_raw(project_section("data", config=None, dataset=str(path), encoding_errors="replace"),
                       tmp_path / "scratch")
    assert ours["train"]["text"] == ["cr\ufffdme"]


def test_get_last_checkpoint_returns_a_checkpoint_cut_short(tmp_path):
    """Why pipeline.training.checkpoints finds the checkpoint to resume itself: transformers' get_last_checkpoint
    returns the highest-numbered folder, whole or not."""
    from transformers.trainer_utils import get_last_checkpoint

    from pipeline.training.checkpoints import COMPLETE, resume_checkpoint, run_folder, start_fresh

    folder = run_folder(tmp_path, "run")
    start_fresh(folder, "run", "sdpa")
    for step, whole in ((4, True), (8, False)):  # 8: the run was killed while the Trainer was writing it
        (folder / f"checkpoint-{step}").mkdir()
        (folder / f"checkpoint-{step}/trainer_state.json").write_text("{}")
        if whole:
            (folder / f"checkpoint-{step}/{COMPLETE}").write_text(json.dumps({"files": {"trainer_state.json": 2}}))
    assert get_last_checkpoint(str(folder)) == str(folder / "checkpoint-8")
    assert resume_checkpoint(folder, "run") == str(folder / "checkpoint-4")
