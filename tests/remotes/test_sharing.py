"""A team's workflow on each remote, as docs/sharing.md tells it: A pushes a run; B, a fresh clone with
empty caches, pulls it and trains nothing; an experiment travels with its model; a run the team already
made is restored from the run-cache instead of trained; and no credential ends up in git, a log or the
model card."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.remotes.conftest import EXPERIMENT
from tests.remotes.team import digests, documented, documented_line, size_mib

pytestmark = pytest.mark.remote
STAGES = ["download", "preprocess", "train", "evaluate", "generate", "report"]


def test_a_fresh_clone_pulls_the_run_and_trains_nothing(team):
    b = team.teammate("b-pull")
    pulled = b.run_documented("Get it on another machine", block=1)
    out = pulled.stdout + pulled.stderr
    assert "Data and pipelines are up to date." in out
    assert "Running stage" not in out and all(f"Stage '{stage}' didn't change" in out for stage in STAGES), out
    assert digests(b.workspace / "models/finetuned") == team.baseline.model
    assert "The for statement" in out  # the ad hoc sample, from the pulled model
    pull_s = b.sh("rm -rf .dvc/cache models data/raw data/processed && dvc pull -q").seconds
    print(f"\n{team.remote.kind}: dvc push {team.push_s:.1f} s, dvc pull {pull_s:.1f} s, "
          f"{size_mib(b.workspace / '.dvc/cache'):.1f} MiB in the cache")


def test_a_shared_experiment_brings_its_model_and_metrics(team, experiment):
    team.a.sh(documented_line("Share experiments", "dvc exp push"))
    b = team.teammate("b-exp")
    b.run_documented("Share experiments", block=1)
    shown = json.loads(b.sh("dvc exp show --json").stdout)
    rows = {run.get("name") or "baseline": run for commit in shown
            for run in [commit] + [r for e in commit.get("experiments") or [] for r in e.get("revs", [])]}
    assert EXPERIMENT in rows, rows.keys()
    metrics = rows[EXPERIMENT]["data"]["metrics"]["metrics/summary.json"]["data"]
    assert metrics == experiment.summary
    assert rows[EXPERIMENT]["data"]["params"]["params.yaml"]["data"]["lr"] == 1e-2
    assert digests(b.workspace / "models/finetuned") == experiment.model


def test_a_run_the_team_made_is_restored_not_trained(team, experiment):
    for line in documented("Never train twice: the run-cache"):
        team.a.sh(team.remote.fill(line))
    c = team.teammate("c-run-cache")
    restored = c.run_documented("Never train twice: the run-cache", block=1)
    out = restored.stdout + restored.stderr
    for stage in ("train", "evaluate", "generate"):
        assert f"Stage '{stage}' is cached - skipping run, checking out outputs" in out, out
        assert f"Running stage '{stage}'" not in out, out
    assert json.loads((c.workspace / "metrics/summary.json").read_text()) == experiment.summary
    assert digests(c.workspace / "models/finetuned") == experiment.model
    print(f"\n{team.remote.kind}: the experiment restored from the run-cache in {restored.seconds:.1f} s; "
          f"trained on A in {experiment.seconds:.1f} s")


def test_no_credential_lands_in_git_a_log_or_the_model_card(team):
    git = ["git", "-C", str(team.origin)]
    history = subprocess.run([*git, "log", "-p", "--all"], capture_output=True, text=True, check=True).stdout
    config = subprocess.run([*git, "show", "main:.dvc/config"], capture_output=True, text=True, check=True).stdout
    card = (team.a.workspace / "models/finetuned/README.md").read_text()
    places = {"the git history": history, "the model card": card,
              **{f"{m.root.name}'s commands and output": "\n".join(m.log) for m in team.machines}}
    assert team.remote.secrets and len(places) > 3
    for secret in team.remote.secrets:
        for place, text in places.items():
            assert secret not in text, f"a credential is in {place}"
    for key in ("access_key", "secret", "keyfile", "user =", "password"):
        assert key not in config, config
