"""The Hub path for real: the download stage and the publish command, as a user runs them, against a
Hugging Face Hub on loopback (tests/hub.py) through HF_ENDPOINT, with the unmodified huggingface_hub,
transformers and datasets. Each command is a process of its own with the Hub switched on, so the
libraries read HF_ENDPOINT when they are imported; the rest of the suite stays offline."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline.core.params import merge
from tests.conftest import ROOT, TINY, in_process
from tests.hub import Hub, folder_files
from tests.hub_repos import (
    DATASET,
    HUB_PARAMS,
    LABEL_NAMES,
    LABELLED,
    MODEL,
    SECRET,
    TOKEN,
    commit_of,
    hub_env,
    serve,
)

ONE_LINE_MAX = 420


@pytest.fixture(scope="module")
def hub(hub_repos):
    server = serve(hub_repos)
    yield server
    server.stop()


def project(root: Path, overrides: dict | None = None) -> Path:
    """A working directory with params.yaml = the project's + TINY + Hub ids (+ overrides)."""
    params = merge(merge(merge(yaml.safe_load((ROOT / "params.yaml").read_text()), TINY), HUB_PARAMS),
                   overrides or {})
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


def command(module: str, cwd: Path, env: dict, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"pipeline.{module}", *args], cwd=cwd, env=env, text=True,
                          capture_output=True, timeout=timeout)


def one_line_error(result: subprocess.CompletedProcess) -> str:
    """The error line of a command that failed as a user error should: exit 2, one line, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and len(errors[0]) <= ONE_LINE_MAX, result.stderr[-2000:]
    return errors[0]


def provenance(root: Path) -> tuple[dict, dict]:
    return (json.loads((root / "models/base/provenance.json").read_text()),
            json.loads((root / "data/raw/provenance.json").read_text()))


# --- download -------------------------------------------------------------------------------------------

def test_a_branch_resolves_to_one_commit_and_everything_comes_from_it(hub, tmp_path):
    root = project(tmp_path / "p", {"model": {"revision": "main"}, "data": {"revision": None}})
    result = command("download", root, hub_env(hub, tmp_path / "home"))
    assert result.returncode == 0, result.stderr[-2000:]
    model, data = provenance(root)
    assert model["resolved_commit"] == model["tokenizer_commit"] == commit_of(hub, "model", MODEL, "main")
    assert data["resolved_commit"] == commit_of(hub, "dataset", DATASET, "main")
    assert (root / "models/base/model.safetensors").read_bytes() == hub.files("model", MODEL)["model.safetensors"]
    assert data["splits"] == {"train": 80, "validation": 12}  # main's train file
    fetched = {path for method, path, _ in hub.requests if "/resolve/" in path}
    assert not any(path.endswith((".bin", "README.md")) and f"/{MODEL}/" in path for path in fetched)


@pytest.mark.parametrize("token, works", [(TOKEN, True), (None, False), ("hf_not_a_token", False)],
                         ids=["token", "no token", "wrong token"])
def test_a_private_model_needs_its_token(hub, tmp_path, token, works):
    root = project(tmp_path / "p", {"model": {"name": SECRET, "revision": "main"}})
    result = command("download", root, hub_env(hub, tmp_path / "home", token))
    if works:
        assert result.returncode == 0, result.stderr[-2000:]
        assert provenance(root)[0]["resolved_commit"] == commit_of(hub, "model", SECRET, "main")
        return
    line = one_line_error(result)
    assert line.startswith("error: model.name: ") and "HF_TOKEN" in line, line
    assert ("refused the token" in line) == (token is not None), line
    assert not (root / "models").exists() and not (root / "data").exists()


MISSING = {
    "repo": ({"model": {"name": "alice/no-such-model"}}, "model.name", "is not on the Hub at"),
    "revision": ({"model": {"revision": "v9"}}, "model.name", "check model.revision"),
    "dataset": ({"data": {"dataset": "alice/no-such-data"}}, "data.dataset", "is not on the Hub at"),
    "dataset revision": ({"data": {"revision": "v9"}}, "data.dataset", "check data.revision"),
    "config": ({"data": {"config": "medium"}}, "data.config", "'medium' not found"),
    "no config": ({"data": {"config": None}}, "data.config", "set data.config to one of them"),
    "split": ({"data": {"train_split": "training"}}, "data.train_split", "it has train, validation"),
    "weights": ({"model": {"name": "alice/pickle-only", "revision": "main"}}, "model.name",
                "has no safetensors weights"),
    "tokenizer files": ({"model": {"name": "alice/no-tokenizer", "revision": "main"}}, "model.name",
                        "has no tokenizer files"),
}


@pytest.mark.parametrize("case", MISSING)
def test_something_missing_on_the_hub_is_one_line_naming_it_and_nothing_is_written(hub, tmp_path, case):
    overrides, key, says = MISSING[case]
    root = project(tmp_path / "p", overrides)
    line = one_line_error(command("download", root, hub_env(hub, tmp_path / "home")))
    assert line.startswith(f"error: {key}: ") and says in line, line
    assert not (root / "models").exists() and not (root / "data").exists()


def test_a_hub_that_is_gone_is_one_line_and_the_cache_serves_an_offline_run(hub_repos, tmp_path):
    hub = serve(hub_repos)
    root, home = project(tmp_path / "p"), tmp_path / "home"
    assert command("download", root, hub_env(hub, home)).returncode == 0
    first = provenance(root)
    hub.stop()
    started = time.monotonic()
    line = one_line_error(command("download", root, hub_env(hub, home)))
    assert time.monotonic() - started < 30
    assert "cannot reach the Hub" in line and "HF_HUB_OFFLINE=1" in line, line
    assert provenance(root) == first  # the outputs of the run before are untouched
    (root / "models/base/provenance.json").unlink()
    offline = command("download", root, hub_env(hub, home, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1"))
    assert offline.returncode == 0, offline.stderr[-2000:]
    assert provenance(root) == first


def test_a_download_stalled_mid_file_is_one_line_in_bounded_time_and_the_next_run_uses_the_cache(hub_repos, tmp_path):
    hub = serve(hub_repos)
    root, home = project(tmp_path / "p"), tmp_path / "home"
    hub.stall = {"model.safetensors": 1_000_000}  # of its 6.5 MB
    try:
        started = time.monotonic()
        result = command("download", root, hub_env(hub, home, HF_HUB_DOWNLOAD_TIMEOUT="1"), timeout=120)
        elapsed = time.monotonic() - started
        line = one_line_error(result)
        assert "stopped answering" in line and "stay in the cache" in line, line
        assert elapsed < 60, elapsed  # huggingface_hub tries a stalled read 6 times, each HF_HUB_DOWNLOAD_TIMEOUT
        assert not (root / "models").exists() and not (root / "data").exists()
        assert not list(home.rglob("*.incomplete"))  # no partial file left to be mistaken for a whole one
        hub.stall = {}
        again = command("download", root, hub_env(hub, home))
        assert again.returncode == 0, again.stderr[-2000:]
        assert (root / "models/base/model.safetensors").read_bytes() == \
            hub.files("model", MODEL, "v1")["model.safetensors"]
        fetched = [path for method, path, _ in hub.requests if method == "GET" and "/resolve/" in path]
        assert sum(path.endswith("/tokenizer.json") for path in fetched) == 1  # the cache served the second run
    finally:
        hub.stop()


def test_a_hub_dataset_with_a_classlabel_column_gives_its_label_names_and_ids(hub, tmp_path):
    """task: classification from a Hub dataset in parquet whose label column is a ClassLabel: its names in
    its own order (sorted, they would be air, land, sea), each record's id kept, the Hub's validation split."""
    root = project(tmp_path / "p", {
        "task": "classification", "data": {"dataset": LABELLED, "config": None, "revision": "main",
                                           "text_column": "sentence"},
        "classify": {"label_column": "topic"}, "preprocess": {"mode": "pad", "block_size": 24, "add_eos": False}})
    result = command("download", root, hub_env(hub, tmp_path / "home"))
    assert result.returncode == 0, result.stderr[-2000:]
    from pipeline.preprocess import main as preprocess  # offline: it reads what download wrote

    result = in_process(preprocess, [], root)
    assert result.returncode == 0, result.stderr[-2000:]
    assert provenance(root)[1]["resolved_commit"] == commit_of(hub, "dataset", LABELLED, "main")
    data = json.loads((root / "metrics/data.json").read_text())
    assert data["labels"] == LABEL_NAMES
    assert data["train"]["label_counts"] == dict.fromkeys(LABEL_NAMES, 8)
    assert data["validation"]["label_counts"] == dict.fromkeys(LABEL_NAMES, 2)
    import datasets

    train = datasets.load_from_disk(str(root / "data/processed"))["train"]
    first = [token for token in train[0]["input_ids"] if token < 50257]
    from transformers import AutoTokenizer

    text = AutoTokenizer.from_pretrained(root / "models/base").decode(first)
    assert LABEL_NAMES[train[0]["labels"]] in text.split()[1], text  # "The <topic> number ..."


# --- publish -------------------------------------------------------------------------------------------

def publish(hub: Hub, root: Path, home: Path, token: str | None, *args: str) -> subprocess.CompletedProcess:
    return command("tools.publish", root, hub_env(hub, home, token), "--model", "models/finetuned", *args)


def test_publish_pushes_weights_tokenizer_and_model_card_to_a_private_repo(hub, pipeline_outputs, tmp_path):
    result = publish(hub, pipeline_outputs, tmp_path, TOKEN, "--repo-id", "alice/published")
    assert result.returncode == 0, result.stderr[-2000:]
    repo = hub.repos[("model", "alice/published")]
    assert repo.private and result.stdout.startswith("published models/finetuned as commit ")
    local = folder_files(pipeline_outputs / "models/finetuned")
    local.pop("manifest.json")  # the pipeline's own check of the folder, not part of the model
    remote = hub.files("model", "alice/published")
    assert {name: data for name, data in remote.items() if name != ".gitattributes"} == local
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md"} <= set(remote)
    assert "| fine-tuned |" in remote["README.md"].decode()  # the card with its metrics
    assert [summary for method, summary, _ in hub.requests if method == "COMMIT"][-1].startswith("Fine-tuned model")
    again = publish(hub, pipeline_outputs, tmp_path, TOKEN, "--repo-id", "alice/published")  # a new commit on top
    assert again.returncode == 0 and len(repo.commits) == 3, again.stderr[-2000:]


@pytest.mark.parametrize("token, args, says", [
    ("hf_not_a_token", ["--repo-id", "alice/refused"], "refused the token"),
    (None, ["--repo-id", "alice/no-token"], "publishing needs a Hub token that can write"),
    (TOKEN, ["--repo-id", "not a/valid id"], "is not a Hub repo id"),
    (TOKEN, ["--repo-id", "a/b/c"], "is not a Hub repo id"),
    (TOKEN, [], "publish.repo_id: is null"),
    (TOKEN, ["--repo-id", "bob/not-yours"], "the token may not write"),
    (TOKEN, ["--repo-id", "alice/open-model"], "exists and is public"),
], ids=["refused token", "no token", "invalid id", "three parts", "no repo id", "not your namespace",
        "public repo, private asked"])
def test_publish_refuses_in_one_line_and_uploads_nothing(hub, pipeline_outputs, tmp_path, token, args, says):
    hub.commit("model", "alice/open-model", {"README.md": b"public already\n"}, private=False)
    before = {key: len(repo.commits) for key, repo in hub.repos.items()}
    line = one_line_error(publish(hub, pipeline_outputs, tmp_path, token, *args))
    assert says in line, line
    assert {key: len(repo.commits) for key, repo in hub.repos.items()} == before


def test_publish_public_creates_a_public_repo_from_the_params(hub, pipeline_outputs, tmp_path):
    params = yaml.safe_load((pipeline_outputs / "params.yaml").read_text())
    params["publish"] = {"repo_id": "alice/from-params", "private": False}
    (tmp_path / "publish.yaml").write_text(yaml.safe_dump(params))
    result = publish(hub, pipeline_outputs, tmp_path, TOKEN, "--params", str(tmp_path / "publish.yaml"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert not hub.repos[("model", "alice/from-params")].private
