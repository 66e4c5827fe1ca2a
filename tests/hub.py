"""A Hugging Face Hub on loopback for the tests: the real huggingface_hub, transformers and datasets
calls run against it through HF_ENDPOINT, so the Hub path of the download stage and the publish
command are tested without the internet and without mocking the libraries.

Repos live in memory as commits of {path: bytes} with branches and tags. It answers what those
libraries ask: repo info by revision, file trees and paths-info, HEAD/GET of `resolve` URLs (with
Range, for resumed downloads), and for uploads whoami, repo creation, the model card's YAML check,
`preupload` (every file "regular", so contents go inline in the commit: no LFS or Xet server is
needed) and NDJSON commits.
Errors carry the Hub's own X-Error-Code headers (RepoNotFound, RevisionNotFound, EntryNotFound),
and a token it does not know gets the Hub's "Invalid credentials in Authorization header".

`stall` makes a file's download stop half-way and hang (the server "stalling mid-file"); `stop()`
makes it go away. `requests` logs what was asked (and the commits received), for tests that check a call was made.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

INVALID_TOKEN = "Invalid credentials in Authorization header"


@dataclass
class Repo:
    kind: str  # "model" or "dataset"
    repo_id: str
    private: bool = False
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)  # branch or tag -> commit

    def resolve(self, revision: str) -> str | None:
        if revision in self.refs:
            return self.refs[revision]
        return revision if revision in self.commits else None


def blob_oid(data: bytes) -> str:
    """git's object id of a blob: what the Hub sends as a regular file's ETag."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def folder_files(folder: Path) -> dict[str, bytes]:
    """{path in the repo: contents} of every file under `folder`."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


class Hub:
    """The server. `tokens` maps each token it accepts to its user name."""

    def __init__(self, tokens: dict[str, str] | None = None) -> None:
        self.repos: dict[tuple[str, str], Repo] = {}
        self.tokens = dict(tokens or {})
        self.stall: dict[str, int] = {}  # file name -> bytes sent before the download hangs
        self.requests: list[tuple[str, str, str | None]] = []  # method, path, Range header
        self._released = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self.url = ""  # http://127.0.0.1:<port> once started; kept after stop(), for "the Hub is gone"

    # --- content ---------------------------------------------------------------------------------

    def commit(self, kind: str, repo_id: str, files: dict[str, bytes], *, branch: str = "main",
               tag: str | None = None, private: bool | None = None, replace: bool = False) -> str:
        """Add a commit on `branch` (created if needed) holding the branch's files updated with `files`
        (or only `files`, with replace); tag it. Returns the commit id."""
        repo = self.repos.setdefault((kind, repo_id), Repo(kind, repo_id))
        if private is not None:
            repo.private = private
        parent = repo.refs.get(branch)
        tree = {} if replace or parent is None else dict(repo.commits[parent])
        tree.update(files)
        sha = hashlib.sha1(json.dumps([parent, sorted((p, blob_oid(d)) for p, d in tree.items())]).encode()).hexdigest()
        repo.commits[sha] = tree
        repo.refs[branch] = sha
        if tag:
            repo.refs[tag] = sha
        return sha

    def files(self, kind: str, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        repo = self.repos[(kind, repo_id)]
        return repo.commits[repo.resolve(revision)]

    # --- running ---------------------------------------------------------------------------------

    def start(self) -> str:
        self._released.clear()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        return self.url

    def stop(self) -> None:
        """Close the port: the next request is refused. Stalled downloads are let go."""
        self._released.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # quiet: tests read hub.requests instead
                pass

            def do_HEAD(self) -> None:
                hub._route(self, "HEAD")

            def do_GET(self) -> None:
                hub._route(self, "GET")

            def do_POST(self) -> None:
                hub._route(self, "POST")

        return Handler

    # --- requests --------------------------------------------------------------------------------

    def _route(self, request: BaseHTTPRequestHandler, method: str) -> None:
        url = urllib.parse.urlsplit(request.path)
        path, query = urllib.parse.unquote(url.path), urllib.parse.parse_qs(url.query)
        self.requests.append((method, path, request.headers.get("Range")))
        body = request.rfile.read(int(request.headers.get("Content-Length") or 0)) if method == "POST" else b""
        user = self._user(request)
        if user is False:
            return self._send(request, 401, {"error": INVALID_TOKEN}, {"X-Error-Message": INVALID_TOKEN})
        if path == "/api/whoami-v2":
            if user is None:
                return self._send(request, 401, {"error": "You must be logged in"})
            return self._send(request, 200, {"type": "user", "name": user, "orgs": [],
                                             "auth": {"type": "access_token", "accessToken": {"role": "write"}}})
        if path == "/api/validate-yaml" and method == "POST":  # upload_folder's check of a README.md's header
            try:
                card_data({"README.md": json.loads(body)["content"].encode()})
            except Exception as e:  # noqa: BLE001 - any YAML error is the card's
                return self._send(request, 400, {"errors": [{"message": f"invalid YAML: {e}"}]})
            return self._send(request, 200, {"errors": [], "warnings": []})
        if path == "/api/repos/create" and method == "POST":
            return self._create(request, user, json.loads(body or b"{}"))
        match = re.fullmatch(r"/api/(models|datasets)/([^/]+/[^/]+)(?:/(revision|tree|paths-info|preupload|commit)"
                             r"/([^/]+)(/.*)?)?", path)
        if match:
            kind, repo_id, action, revision, rest = match.groups()
            return self._api(request, method, user, kind[:-1], repo_id, action, revision or "main",
                             (rest or "").strip("/"), query, body)
        match = re.fullmatch(r"/(datasets/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if match:
            kind = "dataset" if match.group(1) else "model"
            return self._resolve(request, method, user, kind, match.group(2), match.group(3), match.group(4))
        self._send(request, 404, {"error": f"no route {path}"})

    def _user(self, request: BaseHTTPRequestHandler) -> str | None | bool:
        """The token's user, None without a token, False for a token this hub does not know."""
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("Bearer "):
            return None
        return self.tokens.get(auth.removeprefix("Bearer ").strip(), False)

    def _visible(self, request: BaseHTTPRequestHandler, user: str | None, kind: str, repo_id: str) -> Repo | None:
        repo = self.repos.get((kind, repo_id))
        if repo is None or (repo.private and user != repo_id.split("/")[0]):
            self._send(request, 401, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
            return None
        return repo

    def _commit_of(self, request: BaseHTTPRequestHandler, repo: Repo, revision: str) -> str | None:
        sha = repo.resolve(revision)
        if sha is None:
            self._send(request, 404, {"error": f"Invalid rev id: {revision}"}, {"X-Error-Code": "RevisionNotFound"})
        return sha

    def _api(self, request: BaseHTTPRequestHandler, method: str, user: str | None, kind: str, repo_id: str,
             action: str | None, revision: str, rest: str, query: dict, body: bytes) -> None:
        repo = self._visible(request, user, kind, repo_id)
        if repo is None:
            return
        if action in ("preupload", "commit"):
            if user != repo_id.split("/")[0]:
                return self._send(request, 403, {"error": "You don't have the rights to write to this repo"},
                                  {"X-Error-Message": "You don't have the rights to write to this repo"})
            if revision not in repo.refs and repo.commits:
                return self._send(request, 404, {"error": f"Invalid rev id: {revision}"},
                                  {"X-Error-Code": "RevisionNotFound"})
            if action == "preupload":
                files = json.loads(body)["files"]
                return self._send(request, 200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                                            "shouldIgnore": False} for f in files]})
            return self._receive_commit(request, repo, revision, body)
        sha = self._commit_of(request, repo, revision)
        if sha is None:
            return
        tree = repo.commits[sha]
        if action in (None, "revision"):
            return self._send(request, 200, {
                "id": repo_id, "_id": repo_id, "sha": sha, "private": repo.private, "disabled": False, "gated": False,
                "downloads": 0, "likes": 0, "tags": [], "lastModified": "2026-12-01T00:00:00.000Z",
                "siblings": [{"rfilename": name} for name in sorted(tree)], "cardData": card_data(tree)})
        if action == "tree":
            if rest and rest not in tree and not any(p.startswith(rest + "/") for p in tree):
                return self._send(request, 404, {"error": f"{rest} does not exist"}, {"X-Error-Code": "EntryNotFound"})
            recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
            return self._send(request, 200, tree_entries(tree, rest, recursive))
        paths = (json.loads(body) if body.lstrip().startswith(b"{") else
                 {"paths": urllib.parse.parse_qs(body.decode()).get("paths", [])}).get("paths", [])
        self._send(request, 200, [entry for p in paths for entry in tree_entries(tree, "", True)
                                  if entry["path"] == p.strip("/")])

    def _resolve(self, request: BaseHTTPRequestHandler, method: str, user: str | None, kind: str, repo_id: str,
                 revision: str, name: str) -> None:
        repo = self._visible(request, user, kind, repo_id)
        if repo is None:
            return
        sha = self._commit_of(request, repo, revision)
        if sha is None:
            return
        data = repo.commits[sha].get(name)
        if data is None:
            return self._send(request, 404, {"error": "Entry not found"},
                              {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": sha})
        start = 0
        ranged = re.fullmatch(r"bytes=(\d+)-", request.headers.get("Range", ""))
        if ranged and int(ranged.group(1)) < len(data):
            start = int(ranged.group(1))
        headers = {"X-Repo-Commit": sha, "ETag": f'"{blob_oid(data)}"', "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        if start:
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        if method == "HEAD":
            return self._send(request, 200, None, headers, length=len(data))
        part = data[start:]
        if name.rsplit("/", 1)[-1] in self.stall:
            part = part[: max(0, self.stall[name.rsplit("/", 1)[-1]] - start)]
            self._send(request, 206 if start else 200, part, headers, length=len(data) - start)
            self._released.wait(120)  # hang with the rest unsent, until stopped
            request.close_connection = True
            return
        self._send(request, 206 if start else 200, part, headers)

    def _create(self, request: BaseHTTPRequestHandler, user: str | None, payload: dict) -> None:
        if user is None:
            return self._send(request, 401, {"error": "You must be logged in to create a repo"})
        namespace = payload.get("organization") or user
        repo_id, kind = f"{namespace}/{payload['name']}", payload.get("type") or "model"
        if namespace != user:
            return self._send(request, 403, {"error": f"You don't have the rights to create a repo under {namespace}"},
                              {"X-Error-Message": "You don't have the rights to create a repo in this namespace"})
        url = f"{self.url}/{'' if kind == 'model' else kind + 's/'}{repo_id}"
        if (kind, repo_id) in self.repos:  # the Hub names the repo in its 409, and create_repo(exist_ok) reads it
            return self._send(request, 409, {"error": f"You already created this {kind} repo", "url": url})
        private = payload.get("visibility", "private" if payload.get("private") else "public") == "private"
        self.repos[(kind, repo_id)] = Repo(kind, repo_id, private=private)
        self.commit(kind, repo_id, {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"})
        self._send(request, 200, {"url": url, "name": repo_id})

    def _receive_commit(self, request: BaseHTTPRequestHandler, repo: Repo, revision: str, body: bytes) -> None:
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        files, summary = {}, ""
        for line in lines:
            if line["key"] == "header":
                summary = line["value"].get("summary", "")
            elif line["key"] == "file":
                files[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
            else:  # lfsFile, deletedFile, ...: never asked for, since preupload answers "regular"
                return self._send(request, 400, {"error": f"this hub does not take {line['key']} entries"})
        sha = self.commit(repo.kind, repo.repo_id, files, branch=revision)
        prefix = "" if repo.kind == "model" else f"{repo.kind}s/"
        self.requests.append(("COMMIT", summary, None))
        self._send(request, 200, {"success": True, "commitOid": sha,
                                  "commitUrl": f"{self.url}/{prefix}{repo.repo_id}/commit/{sha}"})

    @staticmethod
    def _send(request: BaseHTTPRequestHandler, status: int, payload: object, headers: dict | None = None,
              length: int | None = None) -> None:
        data = payload if isinstance(payload, bytes) else b"" if payload is None else json.dumps(payload).encode()
        request.send_response(status)
        if not isinstance(payload, bytes):
            request.send_header("Content-Type", "application/json")
        for key, value in (headers or {}).items():
            request.send_header(key, value)
        request.send_header("Content-Length", str(len(data) if length is None else length))
        request.end_headers()
        if request.command != "HEAD" and data:
            try:
                request.wfile.write(data)
                request.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (a timeout test)


def tree_entries(tree: dict[str, bytes], under: str, recursive: bool) -> list[dict]:
    """The Hub's tree listing of folder `under`: files with size and oid, and folders."""
    prefix = f"{under}/" if under else ""
    entries: dict[str, dict] = {}
    for path, data in sorted(tree.items()):
        if not path.startswith(prefix):
            continue
        parts = path[len(prefix):].split("/")
        for depth in range(1, len(parts)):
            folder = prefix + "/".join(parts[:depth])
            if recursive or depth == 1:
                entries.setdefault(folder, {"type": "directory", "path": folder, "oid": blob_oid(folder.encode()),
                                            "size": 0})
            if not recursive:
                break
        if recursive or len(parts) == 1:
            entries[path] = {"type": "file", "path": path, "oid": blob_oid(data), "size": len(data)}
    return list(entries.values())


def card_data(tree: dict[str, bytes]) -> dict | None:
    """The YAML header of the repo's README.md, as the Hub returns it in `cardData`."""
    import yaml

    text = tree.get("README.md", b"").decode()
    match = re.match(r"---\n(.*?)\n---", text, re.S)
    return yaml.safe_load(match.group(1)) if match else None
