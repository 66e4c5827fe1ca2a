"""The remotes a team uses, served for real on loopback: OpenSSH's own sshd (Debian's openssh-server) and an
S3-compatible object store (moto's server mode, which DVC's S3 plugin runs its own tests against). Each runs as
its own process, started by the test that needs it and stopped after. A local bare git repository is the git
remote."""

from __future__ import annotations

import getpass
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
INSTALL_SSHD = "install OpenSSH's server: apt-get install openssh-server (.ci/run does)"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(ready, what: str, process: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode} before it was ready")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} was not ready in {timeout:.0f} s")
        time.sleep(0.1)


def accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass
class SSHServer:
    """sshd on 127.0.0.1:port that lets `user` in with `keyfile` (and nothing else); `root` is a folder for
    remotes. Stop with stop()."""

    port: int
    user: str
    keyfile: Path
    root: Path
    process: subprocess.Popen

    def url(self, name: str) -> str:
        return f"ssh://127.0.0.1:{self.port}{self.root / name}"

    def stop(self) -> None:
        stop(self.process)


def keypair(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return path


def start_sshd(workdir: Path) -> SSHServer:
    """sshd with a generated host key and a throwaway user key, on a free port, logging to workdir/sshd.log.
    As root it logs in root; as another user that user (a non-root sshd can only let its own user in)."""
    if not os.access(SSHD, os.X_OK):
        raise RuntimeError(f"{SSHD} not found: {INSTALL_SSHD}")
    workdir.mkdir(parents=True, exist_ok=True)
    host_key = keypair(workdir / "host_key")
    user_key = keypair(workdir / "user_key")
    authorized = workdir / "authorized_keys"
    authorized.write_text((workdir / "user_key.pub").read_text())
    authorized.chmod(0o600)
    if os.geteuid() == 0:  # sshd's privilege separation needs this empty folder; Debian makes it at boot
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    port = free_port()
    config = workdir / "sshd_config"
    config.write_text("\n".join([
        "ListenAddress 127.0.0.1", f"Port {port}", f"HostKey {host_key}", f"AuthorizedKeysFile {authorized}",
        "PasswordAuthentication no", "KbdInteractiveAuthentication no", "PubkeyAuthentication yes",
        "PermitRootLogin prohibit-password", "UsePAM no", "StrictModes no", "PidFile none",
        "Subsystem sftp internal-sftp", "LogLevel VERBOSE", "MaxStartups 100", "MaxSessions 100", ""]))
    log = (workdir / "sshd.log").open("ab")
    process = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdout=log, stderr=log)
    wait_for(lambda: accepts(port), "sshd", process)
    root = workdir / "storage"
    root.mkdir()
    return SSHServer(port, getpass.getuser(), user_key, root, process)


@dataclass
class S3Server:
    """moto's S3-compatible server on 127.0.0.1:port, in its own process, checking credentials as a real store
    does: only the IAM user made at start (access_key_id, secret_access_key) gets in."""

    port: int
    process: subprocess.Popen
    access_key_id: str
    secret_access_key: str

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """The variables boto reads, as a user exports them (never a command line or .dvc/config)."""
        return {"AWS_ACCESS_KEY_ID": self.access_key_id, "AWS_SECRET_ACCESS_KEY": self.secret_access_key,
                "AWS_DEFAULT_REGION": "us-east-1"}

    def client(self):
        return client("s3", self.endpoint, self.access_key_id, self.secret_access_key)

    def bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def stop(self) -> None:
        stop(self.process)


def client(service: str, endpoint: str, key: str, secret: str):
    import boto3

    return boto3.client(service, endpoint_url=endpoint, aws_access_key_id=key, aws_secret_access_key=secret,
                        region_name="us-east-1")


def s3_ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=2):
            return True
    except OSError:
        return False


# moto checks no credentials for its first N requests, then every one: the three that make the team's user
SETUP_REQUESTS = 3


def start_s3(workdir: Path, port: int | None = None) -> S3Server:
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    log = (workdir / "s3.log").open("ab")
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(SETUP_REQUESTS)}
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                               stdout=log, stderr=log, env=env)
    wait_for(lambda: s3_ready(port), "the S3 server (moto)", process)
    iam = client("iam", f"http://127.0.0.1:{port}", "setup", "setup")
    iam.create_user(UserName="team")
    key = iam.create_access_key(UserName="team")["AccessKey"]
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
    iam.put_user_policy(UserName="team", PolicyName="s3", PolicyDocument=json.dumps(policy))
    return S3Server(port, process, key["AccessKeyId"], key["SecretAccessKey"])
