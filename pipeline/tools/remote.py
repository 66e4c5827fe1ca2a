"""Check a DVC remote's copies of the workspace's outputs byte for byte (`make verify-remote`).

DVC names each object on a remote by the md5 of its bytes. `dvc pull` with `verify true` refuses an object
whose bytes do not match, but then says only "Checkout failed ... Is your cache up to date?"; without
`verify` it checks the damaged file out. And `dvc push` skips any object the remote already has, whatever its
bytes, so pushing again does not repair it. This reads every object the workspace's outputs need from the
remote, names each damaged or missing one and the file it holds, and with --delete removes the damaged ones,
with the directory listings that name them (DVC takes a directory whose listing is on the remote as complete),
so that `dvc push` from a machine holding intact files uploads them again. Where it finds a problem it also
clears this machine's record of what the remote holds (DVC's remote index), which `dvc push` trusts.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import click

from pipeline.core.cli import stage_command
from pipeline.core.errors import PipelineError

CHUNK = 1 << 20


@dataclass(frozen=True)
class Entry:
    """A file (or a directory's listing, md5 ending in .dir) of an output, and the object that holds it;
    `listing`: the object of the directory listing that names it, if any."""

    path: str
    md5: str
    listing: str | None = None


@dataclass(frozen=True)
class Finding:
    entry: Entry
    object_path: str
    found: str | None  # the md5 of the remote's bytes; None: no object


def md5_on(fs, path: str) -> str | None:
    if not fs.exists(path):
        return None
    digest = hashlib.md5()
    with fs.open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def outputs(repo) -> list[Entry]:
    """The cached outputs of the workspace's dvc.lock and .dvc files, as DVC recorded them."""
    return [Entry(str(out), out.hash_info.value) for out in repo.index.outs if out.use_cache and out.hash_info]


def check(odb, todo: list[Entry]) -> tuple[list[Finding], int]:
    """(damaged or missing objects, objects read) for `todo` and the files their directory listings name."""
    problems, checked = [], 0
    while todo:
        entry = todo.pop()
        path = odb.oid_to_path(entry.md5)
        found = md5_on(odb.fs, path)
        checked += 1
        if found != entry.md5.removesuffix(".dir"):
            problems.append(Finding(entry, path, found))
        elif entry.md5.endswith(".dir"):  # intact listing: check the files it names
            with odb.fs.open(path, "rb") as f:
                todo += [Entry(f"{entry.path}/{item['relpath']}", item["md5"], path) for item in json.load(f)]
    return problems, checked


def stale(problems: list[Finding]) -> set[str]:
    """What --delete removes: the damaged objects, and the listings naming a damaged or missing file (DVC takes
    a directory whose listing is on the remote as complete, and would not upload its files again)."""
    return ({f.object_path for f in problems if f.found is not None}
            | {f.entry.listing for f in problems if f.entry.listing})


def describe(finding: Finding) -> str:
    if finding.found is None:
        return f"missing: {finding.entry.path} (object {finding.object_path})"
    return f"damaged: {finding.entry.path} (object {finding.object_path} holds bytes whose md5 is {finding.found})"


@stage_command
@click.option("--remote", "-r", default=None, help="The DVC remote to check (default: the project's default).")
@click.option("--delete", is_flag=True, help="Remove the damaged objects, and the directory listings naming a "
                                             "damaged or missing file, from the remote, so `dvc push` from a machine "
                                             "holding intact files uploads them again.")
def main(remote: str | None, delete: bool) -> None:
    """Check that the remote holds every object the workspace's outputs need, intact."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo
    from dvc_data.hashfile.db import get_index

    try:
        with Repo(".") as repo:
            odb = repo.cloud.get_remote_odb(remote, "verify")
            problems, checked = check(odb, outputs(repo))
            for finding in problems:
                click.echo(describe(finding))
            removed = stale(problems) if delete else set()
            for path in removed:
                odb.fs.rm(path)
            if problems:  # DVC's local record of what the remote holds would make `dvc push` skip them
                get_index(odb).clear()
    except DvcException as exc:
        raise PipelineError(f"{exc}") from None
    except OSError as exc:
        raise PipelineError(f"cannot read the remote: {exc}; check its address (dvc remote list) and the "
                            "network") from None
    click.echo(f"{checked} objects read from the remote: {len(problems)} damaged or missing", err=True)
    if removed:
        push = f"dvc push -r {remote}" if remote else "dvc push"
        click.echo(f"removed {len(removed)} objects from the remote: now run `{push}` on a machine whose files are "
                   "intact", err=True)
    elif problems:
        raise PipelineError("objects damaged or missing on the remote: on a machine whose files are intact, run "
                            "`make verify-remote DELETE=1`, then `dvc push`")


if __name__ == "__main__":
    main()
