"""Shared fixtures: everything offline, on a tiny GPT-2 built from a config with GPT-2's real
vocabulary, and on the small corpus in tests/fixtures/corpus (written for these tests)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

# PIPELINE_ALLOW_CPU: the tests train on the CPU by design, also on a GPU host whose torch cannot use its
# GPUs (the tests of that refusal unset it)
os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DVC_NO_ANALYTICS="1",
                  TOKENIZERS_PARALLELISM="false", PIPELINE_ALLOW_CPU="1")

ROOT = Path(__file__).resolve().parents[1]
CORPUS = Path(__file__).parent / "fixtures" / "corpus"

# A 2-layer, 32-wide GPT-2 on 32-token blocks: seconds per stage on 2 CPU cores.
# DeepSpeed's CPU path builds a shared-memory op with the C++ compiler (the image has one: torch.compile
# needs it)
needs_a_compiler = pytest.mark.skipif(shutil.which("c++") is None, reason=(
    "DeepSpeed on a CPU builds its shared-memory op with a C++ compiler, which this machine lacks"))

TINY = {
    "lr": 5.0e-3,
    "model": {"name": "tiny-gpt2", "tokenizer": "data/input/gpt2-tokenizer", "from_scratch": True,
              "config_overrides": {"n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 64}},
    "data": {"dataset": "data/input/corpus", "config": None},
    "preprocess": {"block_size": 32, "add_eos": True, "val_fraction": 0.25},
    "train": {"num_train_epochs": 1, "max_steps": 8, "per_device_train_batch_size": 4, "per_device_eval_batch_size": 8,
              "logging_steps": 2, "eval_steps": 4, "save_steps": 4, "precision": "fp32",
              "attn_implementation": "sdpa"},  # pinned: `auto` measures, and timing must not steer exact tests
    "evaluate": {"batch_size": 8, "precision": "fp32"},
    "generate": {"prompts": ["The river", "A game of chess"], "max_new_tokens": 8, "num_return_sequences": 2},
}


@pytest.fixture(autouse=True, scope="session")
def _hf_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Keep the datasets/transformers cache of the tests out of the user's ~/.cache."""
    os.environ["HF_HOME"] = str(tmp_path_factory.mktemp("hf_home"))


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pipeline.tools.corpora import write_gpt2_tokenizer

    out = tmp_path_factory.mktemp("tokenizer") / "gpt2-tokenizer"
    write_gpt2_tokenizer(out)
    return out


@pytest.fixture
def project(tmp_path: Path, tokenizer_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory with the tiny params.yaml and the assets it names; the test runs there."""

    shutil.copytree(tokenizer_dir, tmp_path / "data/input/gpt2-tokenizer")
    shutil.copytree(CORPUS, tmp_path / "data/input/corpus")
    write_params(tmp_path, {})
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write_params(directory: Path, overrides: dict) -> Path:
    """params.yaml = the project's params.yaml + TINY + overrides."""
    from pipeline.core.params import merge

    params = merge(merge(yaml.safe_load((ROOT / "params.yaml").read_text()), TINY), overrides)
    path = directory / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def in_process(command, args: list[str], cwd: Path, stdin: str | None = None) -> subprocess.CompletedProcess:
    """A stage's Click command run in this process (no interpreter and torch start-up), as a
    CompletedProcess with the exit code and both streams."""
    import logging

    from click.testing import CliRunner

    for handler in logging.root.handlers[:]:  # an earlier run's handler writes to a closed CliRunner stream
        if type(handler) is logging.StreamHandler:
            logging.root.removeHandler(handler)
    before = os.getcwd()
    os.chdir(cwd)
    try:
        result = CliRunner().invoke(command, args, input=stdin)
    finally:
        os.chdir(before)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)


def run_stage(stage: str, *args: str, cwd: Path | None = None, env: dict | None = None,
              stdin: str | None = None) -> subprocess.CompletedProcess:
    """`python -m pipeline.<stage> args...` as a user runs it (with extra environment variables `env`, and
    `stdin` on its standard input)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", f"pipeline.{stage}", *args], cwd=cwd, env=env, text=True,
                          capture_output=True, timeout=600, input=stdin)


def prepare(root: Path, tokenizer_dir: Path, overrides: dict) -> Path:
    """Assets, params.yaml (TINY + overrides), then download and preprocess run in `root` (in process)."""
    from pipeline.download import main as download_main
    from pipeline.preprocess import main as preprocess_main

    shutil.copytree(tokenizer_dir, root / "data/input/gpt2-tokenizer")
    if not (root / "data/input/corpus").exists():  # a test may have written its own corpus there
        shutil.copytree(CORPUS, root / "data/input/corpus")
    write_params(root, overrides)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        download_main.main([], standalone_mode=False)
        preprocess_main.main([], standalone_mode=False)
    finally:
        os.chdir(cwd)
    return root


@pytest.fixture(scope="session")
def pipeline_outputs(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    """A directory where download, preprocess and train have run once on the tiny params (in process)."""
    from pipeline.core.params import load_params
    from pipeline.train import train

    root = prepare(tmp_path_factory.mktemp("outputs"), tokenizer_dir, {})
    train(load_params(root / "params.yaml"), root / "data/processed", root / "models/base",
          root / "models/finetuned", root / "checkpoints", root / "dvclive", root / "metrics/train.json")
    return root


@pytest.fixture(scope="session")
def hub_repos(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> dict:
    """The repos a loopback Hub serves to the tests that run the Hub path (tests/hub_repos.py)."""
    from tests.hub_repos import build_repos

    return build_repos(tmp_path_factory.mktemp("hub-repos"), tokenizer_dir)


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir: Path):
    from pipeline.core.loading import load_tokenizer

    return load_tokenizer(tokenizer_dir)


def data_params(**changes: object):
    """The project's data params with these changes."""
    from tests.support import project_section

    return project_section("data", **changes)


def prep_params(**changes: object):
    """The project's preprocess params with these changes."""
    from tests.support import project_section

    return project_section("preprocess", **changes)


# --- the real pipeline through DVC from a loopback Hub, run once for the session (tests/test_e2e.py, and
# tests/tools/test_compare.py reports on it) ---------------------------------------------------------------

EXPERIMENT = "lower-lr"  # the experiment `experimented` runs: lr 5e-4


def e2e_params() -> dict:
    from pipeline.core.params import merge
    from tests.hub_repos import HUB_PARAMS

    return merge(merge(TINY, HUB_PARAMS), {"generate": {"prompts_file": "data/prompts/extra.txt"}})


@pytest.fixture(scope="session")
def hub(hub_repos):
    from tests.hub_repos import serve

    server = serve(hub_repos)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def online(hub, tmp_path_factory) -> dict[str, str]:
    """The environment of DVC and its stages with the loopback Hub switched on."""
    from tests.hub_repos import hub_env

    return hub_env(hub, tmp_path_factory.mktemp("hf-home"))


def workspace_for(root: Path) -> Path:
    from pipeline.tools.demo import make_workspace

    workspace = make_workspace(root / "ws", e2e_params())
    (workspace / "data/prompts/extra.txt").write_text("The mountain\n")
    return workspace


def repro(workspace: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    ran = subprocess.run([str(Path(sys.executable).parent / "dvc"), "repro", *args], cwd=workspace, env=env,
                         text=True, capture_output=True, timeout=600)
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    return ran


@pytest.fixture(scope="session")
def experimented(tmp_path_factory, online) -> Path:
    """A workspace where `dvc repro` ran from the Hub, was committed as the baseline, and `dvc exp run -n
    lower-lr -S lr=5e-4` followed (its results left in the workspace, as DVC leaves them). Tests that change a
    file put it back."""
    from pipeline.tools.demo import commit_baseline, dvc

    workspace = workspace_for(tmp_path_factory.mktemp("e2e"))
    repro(workspace, online)
    commit_baseline(workspace)
    ran = dvc(workspace, "exp", "run", "-n", EXPERIMENT, "-S", "lr=5e-4", capture=True)
    workspace.joinpath("exp-run.log").write_text(ran.stdout + ran.stderr)
    return workspace
