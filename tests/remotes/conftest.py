"""The servers and the team the remote tests share: one sshd and one S3 server for the session, and machine
A's run of the pipeline in the demo's shape, made once and copied for each remote."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.core.params import merge, read_yaml
from pipeline.tools.demo import ROOT, make_workspace
from tests.remotes.servers import start_s3, start_sshd
from tests.remotes.team import Machine, Remote, copy_machine, digests, documented_line, s3_remote, ssh_remote

# The demo's model and data (examples/demo.yaml), trained for fewer steps
SHAPE = merge(read_yaml(ROOT / "examples/demo.yaml"), {
    "train": {"max_steps": 16, "logging_steps": 4, "eval_steps": 8, "save_steps": 8},
    "generate": {"max_new_tokens": 16, "num_return_sequences": 1}})
EXPERIMENT = "lr-1e-2"  # the name and setting docs/sharing.md uses


@pytest.fixture(scope="session")
def sshd(tmp_path_factory):
    server = start_sshd(tmp_path_factory.mktemp("sshd"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    server = start_s3(tmp_path_factory.mktemp("s3"))
    yield server
    server.stop()


@dataclass
class Run:
    """A run on machine A: its model files (sha256 by path), its headline metrics and how long it took."""

    model: dict[str, str]
    summary: dict
    seconds: float


def run_on(a: Machine, command: str) -> Run:
    seconds = a.sh(command).seconds
    return Run(digests(a.workspace / "models/finetuned"),
               json.loads((a.workspace / "metrics/summary.json").read_text()), seconds)


@pytest.fixture(scope="session")
def machine_a(tmp_path_factory) -> tuple[Path, Run]:
    """Machine A's folder, no remote yet, with the pipeline run and committed (docs: "Push a run", its commit
    line), and that run."""
    folder = tmp_path_factory.mktemp("machine-a")
    a = Machine.new(folder, Remote("none", {}))
    make_workspace(a.workspace, SHAPE)
    baseline = run_on(a, "dvc repro")
    a.sh(documented_line("Push a run", "git add"))
    return folder, baseline


@dataclass
class Team:
    """A's copy for one remote, with that remote set up as documented and the baseline pushed; `origin` is
    the bare git repository everyone clones; `push_s` how long A's `dvc push` took; `machines` all the
    team's machines so far."""

    a: Machine
    remote: Remote
    origin: Path
    baseline: Run
    push_s: float
    machines: list[Machine]

    def teammate(self, name: str) -> Machine:
        """A new machine with a clone of origin (docs: "Get it on another machine", its first block), set up
        for the remote as docs/sharing.md says each teammate does, without pulling anything."""
        machine = Machine.new(self.a.root.parent / name, self.remote)
        self.machines.append(machine)
        machine.run_documented("Get it on another machine", cwd=machine.root, REPO=str(self.origin))
        if self.remote.kind == "ssh":
            machine.run_documented("An SSH server", block=1)
        return machine


@pytest.fixture(scope="session", params=["s3", "ssh"])
def team(request, machine_a, tmp_path_factory) -> Team:
    kind = request.param
    root = tmp_path_factory.mktemp(f"team-{kind}")
    remote = (s3_remote(request.getfixturevalue("s3"), "team-models") if kind == "s3"
              else ssh_remote(request.getfixturevalue("sshd"), "gpt2-pipeline"))
    folder, baseline = machine_a
    copy_machine(folder, root / "a")
    a = Machine(root / "a", remote, root / "a/gpt2-pipeline")
    origin = root / "origin.git"
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(origin)], check=True)
    a.sh(f"git remote add origin {origin}")
    if kind == "s3":
        a.run_documented("An S3-compatible store")
    else:
        a.run_documented("An SSH server")
        a.run_documented("An SSH server", block=1)
    a.sh(documented_line("Push a run", "git push"))
    push_s = a.sh(documented_line("Push a run", "dvc push")).seconds
    return Team(a, remote, origin, baseline, push_s, [a])


@pytest.fixture(scope="session")
def experiment(team) -> Run:
    """A's experiment (docs: "Share experiments"), run once the remote is set up, as a team works; A's
    workspace is set back to the baseline after."""
    run = run_on(team.a, documented_line("Share experiments", "dvc exp run"))
    team.a.sh("git reset -q --hard && dvc checkout -q")
    assert digests(team.a.workspace / "models/finetuned") == team.baseline.model != run.model
    return run
