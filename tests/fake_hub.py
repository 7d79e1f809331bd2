"""A local, in-memory stand-in for the Hugging Face Hub HTTP API (stdlib only), for push tests.

It serves the routes `huggingface_hub` and `transformers` use to create a repo, commit files (NDJSON, base64, always
"regular" uploads: no LFS or Xet), create branches and download files, on 127.0.0.1 with a free port. Every request
is recorded (method, path, Authorization header). `fail(...)` makes it answer 401 everywhere or 500 on commits;
`refuse()` shuts it down so that connections are refused.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit


_REPO = r"(?P<repo>[^/]+/[^/]+)"


@dataclass
class Repo:
    private: bool
    branches: dict[str, dict[str, bytes]] = field(default_factory=lambda: {"main": {}})
    heads: dict[str, str] = field(default_factory=lambda: {"main": "0" * 40})
    commits: list[dict] = field(default_factory=list)
    snapshots: dict[str, dict[str, bytes]] = field(default_factory=lambda: {"0" * 40: {}})  # commit sha -> files

    def resolve(self, rev: str) -> tuple[str, dict[str, bytes]] | None:
        """(commit sha, files) of a branch name or a commit sha; None when unknown."""
        if rev in self.branches:
            return self.heads[rev], self.branches[rev]
        return (rev, self.snapshots[rev]) if rev in self.snapshots else None


@dataclass
class Request:
    method: str
    path: str
    query: str
    authorization: str | None


class FakeHub:
    def __init__(self):
        self.repos: dict[str, Repo] = {}
        self.requests: list[Request] = []
        self.failure: str | None = None  # "unauthorized" or "commit_500"
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def fail(self, failure: str | None) -> None:
        if failure not in (None, "unauthorized", "commit_500"):
            raise ValueError(failure)
        self.failure = failure

    def refuse(self) -> None:
        """Stop serving and close the socket: later connections are refused."""
        self.close()

    def close(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
            self._server.server_close()

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        return dict(self.repos[repo_id].branches[revision])

    # ----- route handlers: return (status, headers, body) -----
    def create_repo(self, body: dict, auth: str | None):
        repo_id = f"{body['organization']}/{body['name']}" if body.get("organization") else f"user/{body['name']}"
        url = f"{self.endpoint}/{repo_id}"
        if repo_id in self.repos:
            return 409, {}, {"error": "You already created this model repo", "url": url}
        private = body.get("visibility") == "private" or bool(body.get("private"))
        self.repos[repo_id] = Repo(private=private)
        return 200, {}, {"url": url, "name": repo_id}

    def commit(self, repo: Repo, repo_id: str, revision: str, payload: bytes):
        if self.failure == "commit_500":
            return 500, {}, {"error": "Internal Error - We're working hard to fix this as soon as possible!"}
        if revision not in repo.branches:
            return 404, {"X-Error-Code": "RevisionNotFound"}, {"error": f"Invalid rev id: {revision}"}
        files, summary = repo.branches[revision], None
        for line in payload.decode().splitlines():
            item = json.loads(line)
            value = item["value"]
            if item["key"] == "header":
                summary = value["summary"]
            elif item["key"] == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif item["key"] in ("deletedFile", "deletedFolder"):
                for path in [p for p in files if p == value["path"] or p.startswith(value["path"].rstrip("/") + "/")]:
                    del files[path]
            else:
                return 400, {}, {"error": f"unsupported commit item {item['key']} (only regular uploads)"}
        sha = hashlib.sha1((repo.heads[revision] + json.dumps(sorted(files)) + str(summary)).encode()).hexdigest()
        repo.heads[revision] = sha
        repo.snapshots[sha] = dict(files)
        repo.commits.append({"revision": revision, "summary": summary, "sha": sha})
        return 200, {}, {"commitUrl": f"{self.endpoint}/{repo_id}/commit/{sha}", "commitOid": sha,
                         "pullRequestUrl": None}  # fmt: skip


def _handler(hub: FakeHub):
    import re

    routes = [
        ("POST", re.compile(r"^/api/repos/create$"), "create"),
        ("POST", re.compile(r"^/api/validate-yaml$"), "validate"),
        ("POST", re.compile(rf"^/api/models/{_REPO}/preupload/(?P<rev>[^/]+)$"), "preupload"),
        ("POST", re.compile(rf"^/api/models/{_REPO}/commit/(?P<rev>[^/]+)$"), "commit"),
        ("POST", re.compile(rf"^/api/models/{_REPO}/branch/(?P<rev>[^/]+)$"), "branch"),
        ("GET", re.compile(rf"^/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?$"), "info"),
        ("GET", re.compile(rf"^/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<file>.*))?$"), "tree"),
        ("GET", re.compile(rf"^/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<file>.+)$"), "resolve"),
        ("HEAD", re.compile(rf"^/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<file>.+)$"), "resolve"),
    ]

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep test output clean
            pass

        def _send(self, status: int, headers: dict, body) -> None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            self.send_response(status)
            if not isinstance(body, bytes):
                self.send_header("Content-Type", "application/json")
            for key, value in headers.items():
                self.send_header(key, value)
            if "Content-Length" not in headers:
                self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def _body(self) -> bytes:
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _dispatch(self) -> None:
            url = urlsplit(self.path)
            auth = self.headers.get("Authorization")
            body = self._body() if self.command == "POST" else b""
            with hub._lock:
                hub.requests.append(Request(self.command, url.path, url.query, auth))
                self._send(*self._route(url.path, auth, body))

        do_GET = do_HEAD = do_POST = _dispatch

        def _route(self, path: str, auth: str | None, body: bytes):
            if hub.failure == "unauthorized":
                return 401, {}, {"error": "Invalid credentials in Authorization header"}
            match = name = None
            for method, pattern, route in routes:
                match = pattern.match(path) if method == self.command else None
                if match:
                    name = route
                    break
            if match is None:
                return 404, {}, {"error": f"fake hub: no route for {self.command} {path}"}
            if name == "create":
                return hub.create_repo(json.loads(body or b"{}"), auth)
            if name == "validate":
                return 200, {}, {"errors": [], "warnings": []}
            repo_id = match["repo"]
            repo = hub.repos.get(repo_id)
            if repo is None or (repo.private and not auth):
                return 401 if repo else 404, {"X-Error-Code": "RepoNotFound"}, {"error": "Repository not found"}
            rev = unquote(match["rev"]) if match["rev"] else "main"
            if name == "preupload":
                files = json.loads(body)["files"]
                return 200, {}, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                                            "oid": None} for f in files]}  # fmt: skip
            if name == "commit":
                return hub.commit(repo, repo_id, rev, body)
            if name == "branch":
                if rev in repo.branches:
                    return 409, {}, {"error": f"Reference {rev} already exists"}
                start = (json.loads(body or b"{}") or {}).get("startingPoint") or "main"
                repo.branches[rev] = dict(repo.branches[start])
                repo.heads[rev] = repo.heads[start]
                return 200, {}, {}
            resolved = repo.resolve(rev)
            if resolved is None:
                return 404, {"X-Error-Code": "RevisionNotFound"}, {"error": f"Invalid rev id: {rev}"}
            sha, files = resolved
            if name == "info":
                return 200, {}, {"id": repo_id, "modelId": repo_id, "sha": sha, "private": repo.private,
                                 "tags": [], "siblings": [{"rfilename": p} for p in sorted(files)]}  # fmt: skip
            if name == "tree":
                prefix = (match["file"] or "").rstrip("/")
                entries = [{"type": "file", "path": p, "size": len(d), "oid": hashlib.sha1(d).hexdigest()}
                           for p, d in sorted(files.items()) if not prefix or p.startswith(prefix + "/")]  # fmt: skip
                return 200, {}, entries
            file = unquote(match["file"])
            if file not in files:
                return 404, {"X-Error-Code": "EntryNotFound"}, {"error": f"Entry not found: {file}"}
            data = files[file]
            headers = {"X-Repo-Commit": sha, "ETag": f'"{hashlib.sha1(data).hexdigest()}"',
                       "Content-Length": str(len(data)), "Content-Type": "application/octet-stream"}  # fmt: skip
            return 200, headers, data

    return Handler
