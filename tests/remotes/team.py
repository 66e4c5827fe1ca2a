"""A team's machines for the remote tests: each a folder with its own HOME (known_hosts, DVC's global config,
caches), its own Hugging Face cache and DVC cache, and the remote's credentials in its environment only. The
commands they run are the ones docs/sharing.md shows, read from it."""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.tools.demo import tool_env
from tests.remotes.servers import S3Server, SSHServer

ROOT = Path(__file__).resolve().parents[2]
SHARING = ROOT / "docs/sharing.md"


def documented(heading: str, block: int = 0) -> list[str]:
    """The command lines of the `block`th ```bash block under `heading` in docs/sharing.md (comments cut)."""
    text = SHARING.read_text()
    start = re.search(rf"^#+ {re.escape(heading)}$", text, re.M)
    assert start, f"docs/sharing.md has no heading {heading!r}"
    section = re.split(r"^#+ ", text[start.end():], maxsplit=1, flags=re.M)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    lines = [line.split("  #")[0].strip() for line in blocks[block].splitlines()]
    return [line for line in lines if line]


def documented_line(heading: str, starts: str) -> str:
    """The one line of the section's first block that starts with `starts`."""
    (line,) = [line for line in documented(heading) if line.startswith(starts)]
    return line


@dataclass
class Remote:
    """One remote as docs/sharing.md sets it up, with the words its examples use swapped for the real server's."""

    kind: str  # "s3" or "ssh"
    words: dict[str, str]
    env: dict[str, str] = field(default_factory=dict)
    secrets: list[str] = field(default_factory=list)

    def fill(self, line: str) -> str:
        for example, real in self.words.items():
            line = line.replace(example, real)
        return line


def s3_remote(server: S3Server, bucket: str) -> Remote:
    server.bucket(bucket)
    return Remote("s3", {"s3://team-models": f"s3://{bucket}", "https://s3.example.com": server.endpoint},
                  server.env(), [server.secret_access_key])


def ssh_remote(server: SSHServer, folder: str) -> Remote:
    words = {"ssh://models.example.com:22/srv/dvc/gpt2-pipeline": server.url(folder),
             "-p 22 models.example.com": f"-p {server.port} 127.0.0.1",
             "storage user alice": f"storage user {server.user}", "~/.ssh/id_ed25519": str(server.keyfile)}
    return Remote("ssh", words, {}, [server.keyfile.read_text().strip().splitlines()[1]])


@dataclass
class Machine:
    """A teammate's machine; `workspace` is its clone of the project. Every command's output goes to `log`."""

    root: Path
    remote: Remote
    workspace: Path
    log: list[str] = field(default_factory=list)

    @classmethod
    def new(cls, root: Path, remote: Remote, workspace: str = "gpt2-pipeline") -> Machine:
        (root / "home/.ssh").mkdir(parents=True)
        return cls(root, remote, root / workspace)

    @property
    def env(self) -> dict[str, str]:
        home = self.root / "home"
        return {**tool_env(), **self.remote.env, "HOME": str(home), "HF_HOME": str(home / "hf"),
                "XDG_CONFIG_HOME": str(home / ".config"), "XDG_CACHE_HOME": str(home / ".cache"),
                "DVC_SITE_CACHE_DIR": str(home / "dvc-site")}

    def sh(self, command: str, check: bool = True, cwd: Path | None = None, timeout: int = 900,
           **extra_env: str) -> subprocess.CompletedProcess:
        """`command` in bash, in the workspace; the result, with `.seconds`."""
        started = time.perf_counter()
        ran = subprocess.run(["bash", "-eo", "pipefail", "-c", command], cwd=cwd or self.workspace, text=True,
                             capture_output=True, timeout=timeout, env={**self.env, **extra_env})
        ran.seconds = time.perf_counter() - started
        self.log.append(f"$ {command}\n{ran.stdout}{ran.stderr}")
        if check:
            assert ran.returncode == 0, f"{command} exited {ran.returncode}:\n{ran.stdout[-3000:]}{ran.stderr[-3000:]}"
        return ran

    def run_documented(self, heading: str, block: int = 0, cwd: Path | None = None,
                       **extra_env: str) -> subprocess.CompletedProcess:
        """The block's lines, filled for this remote, as one script (a `cd` in it holds for the next lines)."""
        script = "\n".join(self.remote.fill(line) for line in documented(heading, block))
        return self.sh(script, cwd=cwd, **extra_env)


def digests(folder: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under `folder`."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def size_mib(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


def copy_machine(source: Path, dest: Path) -> None:
    shutil.copytree(source, dest, symlinks=True)


@dataclass
class S3Place:
    """A location on the S3 server the tests can list and damage behind DVC's back."""

    server: S3Server
    bucket: str

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/gpt2-pipeline"

    def key(self, md5: str) -> str:
        return f"gpt2-pipeline/files/md5/{md5[:2]}/{md5[2:]}"

    def objects(self) -> list[str]:
        listed = self.server.client().list_objects_v2(Bucket=self.bucket, Prefix="gpt2-pipeline/files/md5/")
        return [item["Key"] for item in listed.get("Contents", [])]

    def read(self, md5: str) -> bytes:
        return self.server.client().get_object(Bucket=self.bucket, Key=self.key(md5))["Body"].read()

    def write(self, md5: str, data: bytes) -> None:
        self.server.client().put_object(Bucket=self.bucket, Key=self.key(md5), Body=data)


@dataclass
class SSHPlace:
    """A folder on the SSH server, read and written as its files (the server's disk is this machine's)."""

    server: SSHServer
    name: str

    @property
    def url(self) -> str:
        return self.server.url(self.name)

    def path(self, md5: str) -> Path:
        return self.server.root / self.name / "files/md5" / md5[:2] / md5[2:]

    def objects(self) -> list[str]:
        """Complete objects only: sshfs uploads to a temporary name, then renames."""
        folder = self.server.root / self.name / "files/md5"
        return [str(p) for p in folder.rglob("*") if p.is_file() and not p.name.endswith(".tmp")]

    def read(self, md5: str) -> bytes:
        return self.path(md5).read_bytes()

    def write(self, md5: str, data: bytes) -> None:
        self.path(md5).write_bytes(data)
