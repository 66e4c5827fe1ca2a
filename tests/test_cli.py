"""Every stage through its CLI: --help, and each bad input as one clear line, exit 2, no traceback,
no partial output."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.conftest import in_process, run_stage, write_params

STAGES = ["download", "preprocess", "train", "evaluate", "generate", "report"]
DOWNLOADED = ("data/raw", "models/base")
OUTPUTS = ["data/raw", "models/base", "data/processed", "metrics", "models/finetuned", "outputs", "checkpoints"]


@pytest.mark.parametrize("stage", STAGES + ["tools.params", "tools.recipe", "tools.plots", "tools.demo",
                                            "tools.publish", "tools.compare", "tools.remote"])
def test_help(stage):
    result = run_stage(stage, "--help")
    assert result.returncode == 0 and "Usage:" in result.stdout
    assert {"tools.demo": "--workdir", "tools.plots": "--out", "tools.recipe": "--run", "report": "--train",
            "tools.compare": "--rev", "tools.remote": "--remote"}.get(
        stage, "--params") in result.stdout


def assert_clean_failure(result, project: Path, message: str, existing: tuple[str, ...] = ()) -> None:
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    for out in OUTPUTS:
        assert out in existing or not (project / out).exists(), f"{out} was written"
    assert not list(project.rglob(".*.tmp-*")), "a temporary output was left behind"


@pytest.mark.parametrize("stage", STAGES)
def test_a_stopped_stage_says_what_running_it_again_does(project, monkeypatch, stage):
    """SIGTERM as the stage's handler raises it (pipeline.core.cli.stop), once its params are read."""
    import importlib

    module = importlib.import_module(f"pipeline.{stage}")

    def stopped(*_: object) -> None:
        raise KeyboardInterrupt("stopped by SIGTERM")

    import pipeline.core.preamble as preamble

    for holder in (module, preamble):  # the stage holds the workspace itself, or through start_stage
        if hasattr(holder, "hold_workspace"):
            monkeypatch.setattr(holder, "hold_workspace", stopped)
    result = in_process(module.main, [], project)
    assert result.returncode == 143 and "Traceback" not in result.stderr, result.stderr[-2000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("stopped by SIGTERM: no output is half-written; run it again"), line
    assert ("train resumes from its last checkpoint" in line) == (stage == "train"), line
    assert ("arrived whole stay in the cache" in line) == (stage == "download"), line


@pytest.mark.parametrize("override, message", [
    ({"lr": "fast"}, "params: lr must be a number; got 'fast'"),
    ({"train": {"num_train_epochs": -1}}, "params: train.num_train_epochs must be > 0.0; got -1"),
    ({"train": {"lr_scheduler_type": "exponential"}}, "params: train.lr_scheduler_type must be one of"),
    ({"train": {"learning_rate": 1e-3}}, "params: train.learning_rate is not a known parameter"),
    ({"preprocess": {"block_size": 128}}, "block_size (128) exceeds model.config_overrides.n_positions (64)"),
])
@pytest.mark.parametrize("stage", ["download", "train"])
def test_bad_params(project, stage, override, message):
    write_params(project, override)
    assert_clean_failure(run_stage(stage, cwd=project), project, message)


def test_missing_dataset_path(project):
    write_params(project, {"data": {"dataset": "data/input/no-such-corpus/"}})
    assert_clean_failure(run_stage("download", cwd=project), project, "data.dataset: no data files at")


def test_model_directory_without_weights(project):
    (project / "data/input/empty-model").mkdir()
    (project / "data/input/empty-model/config.json").write_text("{}")
    write_params(project, {"model": {"name": "data/input/empty-model", "tokenizer": "data/input/gpt2-tokenizer",
                                     "from_scratch": False, "config_overrides": {}}})
    result = run_stage("download", cwd=project)
    assert_clean_failure(result, project, "empty-model has no model weights (*.safetensors)", ("data/raw",))


def download(project: Path) -> None:
    """The download stage as the set-up of a test about a later stage: in process, to save the start-up."""
    from pipeline.download import main

    result = in_process(main, [], project)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.fixture
def downloaded(project):
    download(project)
    return project


def test_empty_corpus(downloaded):
    """Empty files hold no records: skipped beside others (tests/test_bad_records.py), one line when all are."""
    for f in (downloaded / "data/input/corpus").glob("*.txt"):
        f.write_text("")
    shutil.rmtree(downloaded / "data/raw")
    assert_clean_failure(run_stage("download", cwd=downloaded), downloaded, "every file at 'data/input/corpus' is "
                         "empty", ("models/base",))


@pytest.mark.parametrize("override, message", [
    ({"data": {"text_column": "body"}}, "data.text_column: field 'body' is not in the records; they have text"),
    ({"data": {"template": "Title: {title}\n{text}"}},
     "data.template: field 'title' is not in the records; they have text"),
    ({"preprocess": {"min_chars": 100_000}}, "empty corpus: no train documents left after cleaning"),
], ids=["unknown text column", "template field missing", "nothing left after filtering"])
def test_records_that_do_not_fit_the_params(downloaded, override, message):
    write_params(downloaded, override)
    assert_clean_failure(run_stage("preprocess", cwd=downloaded), downloaded, message, DOWNLOADED)


def test_block_size_larger_than_the_models_positions(downloaded):
    # a pretrained model's n_positions is only known from its config: preprocess checks it
    shutil.copytree(downloaded / "models/base", downloaded / "data/input/pretrained")
    write_params(downloaded, {"model": {"name": "data/input/pretrained", "tokenizer": None, "from_scratch": False,
                                        "config_overrides": {}}, "preprocess": {"block_size": 128}})
    download(downloaded)
    assert_clean_failure(run_stage("preprocess", cwd=downloaded), downloaded,
                         "block_size (128) exceeds the model's n_positions (64); set block_size to at most 64",
                         DOWNLOADED)


def test_stage_run_before_its_inputs_exist(project):
    missing = "data/processed is not a saved dataset; run the preprocess stage first (dvc repro preprocess)"
    assert_clean_failure(run_stage("train", cwd=project), project, missing)
    assert_clean_failure(run_stage("evaluate", cwd=project), project,  # both models are checked first
                         "models/base does not exist; run the download stage first (dvc repro download)")
    assert_clean_failure(run_stage("generate", cwd=project), project,
                         "models/finetuned does not exist; run the train stage first (dvc repro train)")


# --- bad data, each through the CLI ------------------------------------------------------------------

def test_non_utf8_file(project):
    (project / "data/input/corpus/latin1.txt").write_bytes(b"cr\xe8me br\xfbl\xe9e\n")
    assert_clean_failure(run_stage("download", cwd=project), project,
                         "latin1.txt is not UTF-8: byte 0xe8 at offset 2; convert it")


def test_url_checksum_differs(project):
    import functools
    import http.server
    import threading

    (project / "www").mkdir()
    (project / "www/corpus.txt").write_text("served text\n")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(project / "www"))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        write_params(project, {"data": {"dataset": f"http://127.0.0.1:{httpd.server_address[1]}/corpus.txt",
                                        "sha256": "0" * 64}})
        assert_clean_failure(run_stage("download", cwd=project), project, "data.sha256: http://127.0.0.1")
    finally:
        httpd.shutdown()


def test_csv_without_header(project):
    shutil.rmtree(project / "data/input/corpus")
    (project / "data/input/corpus").mkdir()
    jokes = "Why did the chicken cross the road?,To get to the other side\nWhat is brown and sticky?,A stick\n"
    (project / "data/input/corpus/jokes.csv").write_text(jokes)
    download(project)
    assert_clean_failure(run_stage("preprocess", cwd=project), project,
                         "if the CSV file has no header row, add one naming the columns", DOWNLOADED)

