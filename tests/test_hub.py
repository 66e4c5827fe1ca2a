"""The Hub path for real: the download stage and the publish command, as a user runs them, against a
Hugging Face Hub on loopback (tests/hub.py) through HF_ENDPOINT, with the unmodified huggingface_hub,
transformers and datasets. Each command is a process of its own with the Hub switched on, so the
libraries read HF_ENDPOINT when they are imported; the rest of the suite stays offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline.core.params import merge
from tests.conftest import ROOT, TINY
from tests.hub import Hub, folder_files

TOKEN = "hf_alice_write_token"
MODEL, SECRET, DATASET = "alice/tiny-gpt2", "alice/secret-gpt2", "alice/tiny-text"
ONE_LINE_MAX = 420


def tiny_gpt2(seed: int, out: Path, tokenizer_dir: Path) -> dict[str, bytes]:
    """The files of a repo holding a 2-layer, 32-wide GPT-2 (seeded weights) and GPT-2's tokenizer."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=50257)).save_pretrained(out)
    return {**folder_files(tokenizer_dir), **folder_files(out)}


def jsonl(texts: list[str]) -> bytes:
    return "".join(json.dumps({"text": text}) + "\n" for text in texts).encode()


DATASET_CARD = b"""---
configs:
- config_name: small
  data_files:
  - {split: train, path: small/train.jsonl}
  - {split: validation, path: small/validation.jsonl}
- config_name: large
  data_files:
  - {split: train, path: large/train.jsonl}
---
Two configs of short made-up sentences, for the pipeline's tests.
"""


def sentences(count: int, topic: str) -> list[str]:
    return [f"The {topic} number {i} crossed the river at dawn, and the town watched it go by." for i in range(count)]


@pytest.fixture(scope="module")
def repos(tmp_path_factory, tokenizer_dir) -> dict:
    """What every Hub in this module serves: a model at tag v1 with main moved on after it (new weights),
    a private model, a model with pickle weights only, a model without tokenizer files, and a dataset
    with two configs at tag v1, main moved on after it (more rows)."""
    work = tmp_path_factory.mktemp("repos")
    v1, v2 = tiny_gpt2(0, work / "v1", tokenizer_dir), tiny_gpt2(1, work / "v2", tokenizer_dir)
    data_v1 = {"README.md": DATASET_CARD, "small/train.jsonl": jsonl(sentences(60, "boat")),
               "small/validation.jsonl": jsonl(sentences(12, "bridge")),
               "large/train.jsonl": jsonl(sentences(90, "cart"))}
    data_v2 = {"small/train.jsonl": jsonl(sentences(80, "barge"))}
    pickle_only = {name: data for name, data in v1.items() if name != "model.safetensors"}
    pickle_only["pytorch_model.bin"] = b"not loaded: pickle weights can run code"
    no_tokenizer = {name: v1[name] for name in ("config.json", "generation_config.json", "model.safetensors")}
    return {"model": [v1, v2], "dataset": [data_v1, data_v2], "pickle": pickle_only, "no_tokenizer": no_tokenizer}


def serve(repos: dict) -> Hub:
    hub = Hub(tokens={TOKEN: "alice"})
    for kind, (first, second) in (("model", repos["model"]), ("dataset", repos["dataset"])):
        name = MODEL if kind == "model" else DATASET
        hub.commit(kind, name, first, tag="v1")
        hub.commit(kind, name, second)  # main moves on after v1
    hub.commit("model", SECRET, repos["model"][0], private=True)
    hub.commit("model", "alice/pickle-only", repos["pickle"])
    hub.commit("model", "alice/no-tokenizer", repos["no_tokenizer"])
    hub.start()
    return hub


@pytest.fixture(scope="module")
def hub(repos):
    server = serve(repos)
    yield server
    server.stop()


def hub_env(hub: Hub, home: Path, token: str | None = None, **extra: str) -> dict[str, str]:
    """The environment of a command that talks to `hub`: online, its own HF_HOME, short timeouts."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN")}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(home), HF_HUB_DOWNLOAD_TIMEOUT="2", HF_HUB_ETAG_TIMEOUT="2",
               HF_HUB_DISABLE_TELEMETRY="1", PYTHONPATH=str(ROOT),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    env.update(extra)
    if token:
        env["HF_TOKEN"] = token
    return env


HUB_PARAMS = {"model": {"name": MODEL, "revision": "v1", "tokenizer": None, "from_scratch": False,
                        "config_overrides": {}},
              "data": {"dataset": DATASET, "config": "small", "revision": "v1"}}


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


def commit_of(hub: Hub, kind: str, repo_id: str, revision: str) -> str:
    return hub.repos[(kind, repo_id)].resolve(revision)


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


def test_a_hub_that_is_gone_is_one_line_and_the_cache_serves_an_offline_run(repos, tmp_path):
    hub = serve(repos)
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


def test_a_download_stalled_mid_file_is_one_line_in_bounded_time_and_the_next_run_uses_the_cache(repos, tmp_path):
    hub = serve(repos)
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


# --- the pipeline from Hub ids -----------------------------------------------------------------------

@pytest.mark.e2e
def test_dvc_repro_from_hub_ids_records_what_it_ran_on_and_a_pinned_revision_reproduces(repos, tmp_path,
                                                                                         tokenizer_dir):
    from pipeline.tools.demo import make_workspace

    hub = serve(repos)
    try:
        workspace = make_workspace(tmp_path / "ws", merge(TINY, HUB_PARAMS))
        env = hub_env(hub, tmp_path / "home")
        dvc = [str(Path(sys.executable).parent / "dvc")]
        ran = subprocess.run([*dvc, "repro"], cwd=workspace, env=env, text=True, capture_output=True, timeout=600)
        assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
        model, data = provenance(workspace)
        v1_model, v1_data = commit_of(hub, "model", MODEL, "v1"), commit_of(hub, "dataset", DATASET, "v1")
        assert model["resolved_commit"] == v1_model != commit_of(hub, "model", MODEL, "main")
        assert data["resolved_commit"] == v1_data != commit_of(hub, "dataset", DATASET, "main")
        card = (workspace / "models/finetuned/README.md").read_text()
        assert f"base_model: {MODEL}" in card and v1_model in card and v1_data in card
        summary = json.loads((workspace / "metrics/summary.json").read_text())
        assert summary["ppl"] < summary["ppl_base"]
        lock = (workspace / "dvc.lock").read_text()
        # main moves on again; the pinned revisions give the same outputs, so nothing downstream re-runs
        hub.commit("model", MODEL, tiny_gpt2(2, tmp_path / "v3", tokenizer_dir))
        hub.commit("dataset", DATASET, {"small/train.jsonl": jsonl(sentences(5, "raft"))})
        again = subprocess.run([*dvc, "repro", "-f", "-s", "download"], cwd=workspace, env=env, text=True,
                               capture_output=True, timeout=600)
        assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
        assert (workspace / "dvc.lock").read_text() == lock
        status = subprocess.run([*dvc, "status"], cwd=workspace, env=env, text=True, capture_output=True)
        assert "Data and pipelines are up to date" in status.stdout, status.stdout
    finally:
        hub.stop()


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
