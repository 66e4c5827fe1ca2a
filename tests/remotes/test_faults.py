"""Faults a team meets, on the real servers: a remote that is down or refuses the credentials, a push killed
half-way, an object damaged on the remote, a pull over local changes. Each shows what the user sees and that
nothing is lost. Each test pushes to a location of its own, so the shared one stays intact."""

from __future__ import annotations

import hashlib
import signal
import subprocess
import time

import pytest

from tests.remotes.servers import free_port, keypair
from tests.remotes.team import S3Place, SSHPlace, digests

pytestmark = pytest.mark.remote


def place(team, request, name: str):
    if team.remote.kind == "s3":
        server = request.getfixturevalue("s3")
        server.bucket(name)
        return S3Place(server, name)
    return SSHPlace(request.getfixturevalue("sshd"), name)


def moved_to(team, request, name: str):
    """A copy of A and a teammate, both pointed (in .dvc/config.local) at a new location `name` of the remote;
    A has pushed nothing there yet."""
    where = place(team, request, name)
    a = team.teammate(f"{name}-a")
    a.sh(f"cp -a {team.a.workspace}/. . && dvc remote modify --local storage url {where.url}")
    b = team.teammate(f"{name}-b")
    b.sh(f"dvc remote modify --local storage url {where.url}")
    return a, b, where


def test_a_remote_that_is_down_says_so_and_the_next_pull_works(team):
    b = team.teammate("down")
    closed = free_port()
    setting = (f"endpointurl http://127.0.0.1:{closed}" if team.remote.kind == "s3"
               else f"port {closed}")
    b.sh(f"dvc remote modify --local storage {setting}")
    failed = b.sh("dvc pull", check=False, AWS_MAX_ATTEMPTS="1")  # as docs/sharing.md says, not minutes of retries
    said = failed.stdout + failed.stderr
    print(f"\n{team.remote.kind}: a pull from a remote that is down failed in {failed.seconds:.1f} s")
    assert failed.returncode != 0 and "Traceback" not in said
    assert ("Could not connect to the endpoint URL" if team.remote.kind == "s3" else "Connect call failed") in said
    assert not (b.workspace / "models/finetuned").exists()
    b.sh(f"dvc remote modify --local --unset storage {setting.split()[0]} && dvc pull")
    assert digests(b.workspace / "models/finetuned") == team.baseline.model


def test_a_remote_that_refuses_the_credentials_says_so(team, tmp_path):
    b = team.teammate("refused")
    if team.remote.kind == "s3":
        failed = b.sh("dvc pull", check=False, AWS_SECRET_ACCESS_KEY="not-the-team-secret")
        expected = "Forbidden"
    else:
        stranger = keypair(tmp_path / "stranger")
        b.sh(f"dvc remote modify --local storage keyfile {stranger}")
        failed = b.sh("dvc pull", check=False)
        expected = "Permission denied"
    said = failed.stdout + failed.stderr
    assert failed.returncode != 0 and expected in said and "Traceback" not in said, said
    assert not (b.workspace / "models/finetuned").exists()


def test_a_push_killed_half_way_completes_when_run_again(team, request):
    a, b, where = moved_to(team, request, "killed")
    push = subprocess.Popen(["dvc", "push", "-j", "1"], cwd=a.workspace, env=a.env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not where.objects() and push.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    push.send_signal(signal.SIGKILL)
    push.wait()
    at_kill = len(where.objects())
    again = a.sh("dvc push")
    total = len(where.objects())
    print(f"\n{team.remote.kind}: killed with {at_kill} of {total} objects on the remote; the second push: "
          f"{(again.stdout + again.stderr).strip().splitlines()[-1]}")
    assert push.returncode == -signal.SIGKILL and 0 < at_kill < total
    b.sh("dvc pull")
    assert digests(b.workspace / "models/finetuned") == team.baseline.model


def test_a_damaged_object_is_refused_named_and_repaired(team, request):
    a, b, where = moved_to(team, request, "damaged")
    a.sh("dvc push")
    model = a.workspace / "models/finetuned/model.safetensors"
    md5 = hashlib.md5(model.read_bytes()).hexdigest()
    damaged = bytearray(where.read(md5))
    damaged[len(damaged) // 2] ^= 0xFF
    where.write(md5, bytes(damaged))

    pulled = b.sh("dvc pull", check=False)
    assert pulled.returncode != 0 and "Checkout failed" in pulled.stdout + pulled.stderr
    checked_out = b.workspace / "models/finetuned/model.safetensors"
    assert not checked_out.exists() or checked_out.read_bytes() == model.read_bytes()

    found = b.sh("python -m pipeline.tools.remote", check=False)
    assert found.returncode == 2, found.stderr
    assert "damaged: models/finetuned/model.safetensors (object " in found.stdout, found.stdout
    assert len(found.stdout.splitlines()) == 1 and "make verify-remote DELETE=1" in found.stderr
    assert "1 damaged or missing" in found.stderr

    a.sh("python -m pipeline.tools.remote --delete", check=False)
    a.sh("dvc push && python -m pipeline.tools.remote")  # intact again: exit 0
    b.sh("dvc pull")
    assert digests(b.workspace / "models/finetuned") == team.baseline.model


def test_a_pull_over_a_changed_output_keeps_the_change(team):
    b = team.teammate("changed")
    b.sh("dvc pull")
    config = b.workspace / "models/finetuned/config.json"
    config.write_text(config.read_text() + "\n")
    changed = config.read_bytes()
    refused = b.sh("dvc pull", check=False)
    said = refused.stdout + refused.stderr
    assert refused.returncode != 0 and "Use `--force` to force." in said and "Traceback" not in said, said
    assert config.read_bytes() == changed
    b.sh("dvc pull --force")
    assert digests(b.workspace / "models/finetuned") == team.baseline.model
