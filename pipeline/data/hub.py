"""The Hugging Face Hub, through huggingface_hub's own API: a revision resolved to one commit before
anything is downloaded (so a model's weights, config and tokenizer, or a dataset's files, all come
from that commit even if the branch moves meanwhile, and the run records exactly what it used),
model repos fetched as a snapshot of the files the pipeline loads, and the failures a user can do
something about (no such repo or revision, a private repo without a token, a refused token, a Hub
that cannot be reached or stops answering mid-file) turned into one line naming the fix.

The endpoint is huggingface_hub's (HF_ENDPOINT, read when the library is imported), the token its
own (HF_TOKEN, or `hf auth login`). With HF_HUB_OFFLINE=1 revisions resolve from the local cache
(refs/ in HF_HOME); without it a Hub that cannot be reached is an error, not a quiet fall-back to
whatever commit the cache last saw for a branch.
"""

from __future__ import annotations

import typing
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from pipeline.core.errors import PipelineError, one_line

T = TypeVar("T")

# What the pipeline loads from a model repo: config, safetensors weights (sharded too), tokenizer
# files, chat templates; never pickle weights, other frameworks' files or subfolders (onnx/, ...).
TOKENIZER_FILES = ["*.json", "*.txt", "*.model", "*.tiktoken", "*.jinja"]
WEIGHTS = ["*.safetensors"]
REMOTE_CODE_FILES = ["*.py"]  # only with trust_remote_code


def endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


class Unreachable(Exception):
    """The Hub did not answer (refused, timed out, or a server error)."""


def resolve(repo_id: str, revision: str | None, kind: str, key: str) -> str:
    """The commit `revision` (None: the default branch) of a model or dataset repo points to now, asked
    of the Hub (huggingface_hub caches the answer in refs/ for offline runs), or read from that cache
    when HF_HUB_OFFLINE=1."""
    from huggingface_hub import HfApi, constants

    class Api(HfApi):  # resolve_revision falls back to the cache when the Hub is unreachable: refused here
        def repo_info(self, *args: typing.Any, **kwargs: typing.Any) -> typing.Any:
            import httpx2
            from huggingface_hub import errors

            try:
                return super().repo_info(*args, **kwargs)
            except httpx2.TransportError as e:
                raise Unreachable(f"{type(e).__name__}: {e}") from None
            except errors.HfHubHTTPError as e:
                if e.response is not None and e.response.status_code >= 500:
                    raise Unreachable(f"HTTP {e.response.status_code}") from None
                raise

    what = f"{kind} {repo_id!r} (revision {revision or 'main'})"
    try:
        resolved = hub_call(lambda: Api().resolve_revision(repo_id, repo_type=kind, revision=revision,
                                                           local_files_only=constants.HF_HUB_OFFLINE), what, key)
    except Unreachable as e:
        fail(key, f"cannot reach the Hub at {endpoint()} to resolve {what} ({one_line(str(e), 100)}); check the "
                  "network and HF_ENDPOINT, or set HF_HUB_OFFLINE=1 to use what the local cache holds")
    return resolved.resolved


def snapshot(repo_id: str, commit: str, trust_remote_code: bool, key: str, weights: bool = True) -> Path:
    """The folder in the Hub cache holding a model repo's files at `commit`: config and tokenizer files,
    and the safetensors weights unless `weights` is false (a tokenizer alone)."""
    from huggingface_hub import snapshot_download

    patterns = TOKENIZER_FILES + (WEIGHTS if weights else []) + (REMOTE_CODE_FILES if trust_remote_code else [])
    folder = hub_call(lambda: snapshot_download(repo_id, revision=commit, allow_patterns=patterns,
                                                ignore_patterns=["*/*"]),
                      f"model {repo_id!r} at commit {commit}", key)
    path = Path(folder)
    if not weights:
        if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
            raise PipelineError(f"{key}: {repo_id!r} at commit {commit} has no tokenizer files (tokenizer.json, "
                                "tokenizer_config.json); set model.tokenizer to a repo or folder that has them")
        return path
    if not (path / "config.json").is_file():
        raise PipelineError(f"{key}: {repo_id!r} at commit {commit} has no config.json, so it is not a transformers "
                            "model; check the id and revision")
    if not any(path.glob("*.safetensors")):
        raise PipelineError(f"{key}: {repo_id!r} at commit {commit} has no safetensors weights (only pickle files, "
                            "which can run code when loaded, or none); pick a revision or repo with model.safetensors")
    return path


def hub_call(fetch: Callable[[], T], what: str, key: str, access: str = "read") -> T:
    """Run a Hub call about `what`; the failures a user can fix become one line naming `key` (the param).
    `access`: what the call needs the token for, "read" or "write"."""
    import httpx2
    from huggingface_hub import errors

    try:
        return fetch()
    except errors.RevisionNotFoundError:
        fail(key, f"{what}: the revision is not a branch, tag or commit of the repo; check {key.split('.')[0]}."
                  "revision")
    except errors.RepositoryNotFoundError:
        fail(key, f"{what} is not on the Hub at {endpoint()}, or it is private or gated; {token_fix(access)}")
    except errors.HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        reason = one_line(e.server_message or "", 120) or "no reason given"
        if status == 401:
            fail(key, f"the Hub at {endpoint()} refused the token for {what} ({reason}); set HF_TOKEN to a valid "
                      f"token{', one that can write' if access == 'write' else ', or unset it for public repos'}")
        if status == 403:
            fail(key, f"the token may not {access} {what} ({reason}); {token_fix(access)}")
        fail(key, f"the Hub at {endpoint()} answered HTTP {status} for {what} ({reason}); try again later")
    except errors.RevisionResolutionError:  # offline, and the cache never saw this revision
        fail(key, f"HF_HUB_OFFLINE is set and the local cache ({cache_dir()}) has never resolved {what}; run "
                  "download once with the Hub reachable, or try the offline demo (make demo)")
    except errors.IncompleteSnapshotError:
        fail(key, f"cannot reach the Hub at {endpoint()}, and the local cache holds only part of {what}; "
                  "run again once the Hub answers")
    except errors.LocalEntryNotFoundError:
        fail(key, f"cannot reach the Hub at {endpoint()} to fetch {what}, and it is not in the local cache "
                  f"({cache_dir()}); check the network (and HF_ENDPOINT)")
    except (httpx2.TransportError, ConnectionError, TimeoutError) as e:  # refused, reset, a read that timed out
        fail(key, f"the Hub at {endpoint()} stopped answering for {what} ({type(e).__name__}); run again"
                  + (f": the files that arrived whole stay in the cache ({cache_dir()}) and are not fetched again"
                     if access == "read" else ""))


def token_fix(access: str) -> str:
    """What to do about a repo the Hub will not show: check the id, or the token."""
    from huggingface_hub import get_token

    if get_token() is None:
        return f"check the id, or set HF_TOKEN to a token that can {access} it"
    return f"check the id, and that the token (HF_TOKEN, or the one `hf auth login` saved) can {access} it"


def cache_dir() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def fail(key: str, problem: str) -> typing.NoReturn:
    raise PipelineError(f"{key}: {problem}") from None
