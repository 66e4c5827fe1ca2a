"""DVC's own reusable remote suite (dvc.testing.remote_tests.TestRemote: status, push and pull of files and
directories with the cache moved away and cleared, the run-cache's push and pull, objects under a 00 prefix)
against the two servers, as DVC's S3 and SSH plugins run it against theirs: a check that the servers the
other remote tests use behave as DVC expects."""

from __future__ import annotations

import uuid

import pytest
from dvc.testing import remote_tests  # its TestRemote, subclassed below (imported bare, pytest would collect it)
from dvc.testing.fixtures import *  # noqa: F403  (tmp_dir, dvc, scm, make_remote, ...: DVC's own fixtures)
from dvc_s3.tests.cloud import S3
from dvc_ssh.tests.cloud import SSH

pytestmark = pytest.mark.remote


@pytest.fixture(scope="session")
def worker_id() -> str:
    """pytest-xdist's fixture, which DVC's tmp_dir reads; one worker here."""
    return "master"


@pytest.fixture
def known_hosts(sshd, tmp_path, monkeypatch) -> None:
    """A HOME whose ~/.ssh/known_hosts has the server's key, as `ssh-keyscan` writes it (DVC checks it)."""
    import subprocess

    keys = subprocess.run(["ssh-keyscan", "-p", str(sshd.port), "127.0.0.1"], capture_output=True, text=True,
                          check=True).stdout
    (tmp_path / "home/.ssh").mkdir(parents=True)
    (tmp_path / "home/.ssh/known_hosts").write_text(keys)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


class LoopbackSSH(SSH):
    """DVC's SSH test cloud, logging in as this server's user with its key (DVC's has a fixed user and key)."""

    server = None

    @property
    def config(self):
        return {"url": self.url, "user": self.server.user, "keyfile": str(self.server.keyfile)}

    @property
    def _ssh(self):
        from sshfs import SSHFileSystem

        return SSHFileSystem(host=self.host, port=self.port, username=self.server.user,
                             client_keys=[str(self.server.keyfile)])


@pytest.fixture
def make_s3(s3):
    def make():
        bucket = s3.bucket(f"dvc-suite-{uuid.uuid4().hex[:12]}")
        return S3(f"s3://{bucket}", config={"endpoint_url": s3.endpoint, "aws_access_key_id": s3.access_key_id,
                                             "aws_secret_access_key": s3.secret_access_key})
    return make


@pytest.fixture
def make_ssh(sshd, known_hosts, monkeypatch):
    def make():
        from dvc_ssh import SSHFileSystem

        monkeypatch.setattr(SSHFileSystem, "CAN_TRAVERSE", False)  # as DVC's own SSH tests run it
        LoopbackSSH.server = sshd
        url = LoopbackSSH(sshd.url(f"dvc-suite/{uuid.uuid4().hex[:12]}"))
        url.mkdir(exist_ok=True, parents=True)
        return url
    return make


class TestS3Remote(remote_tests.TestRemote):
    @pytest.fixture
    def remote(self, make_remote):
        return make_remote(name="upstream", typ="s3")


class TestSSHRemote(remote_tests.TestRemote):
    @pytest.fixture
    def remote(self, make_remote):
        return make_remote(name="upstream", typ="ssh")
