"""A Hugging Face hub on loopback, for tests of hub downloads: it serves local folders as repositories."""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import huggingface_hub.constants


class FakeHub:
    """A Hugging Face hub on loopback that serves local folders as repositories: the API calls a download makes
    (model info, file tree) and the files, each file served recorded as (repository, revision, path) and each
    request's path in `requests`."""

    def __init__(self):
        self.repos: dict[str, Path] = {}
        self.served: list[tuple[str, str, str]] = []
        self.requests: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def reply(self, code: int, body: bytes, headers: dict) -> None:
                self.send_response(code)
                for key, value in {**headers, "Content-Length": str(len(body))}.items():
                    self.send_header(key, value)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def do_GET(self):
                path = self.path.split("?")[0]
                hub.requests.append(path)
                for repo, folder in hub.repos.items():
                    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
                    if path.startswith(f"/api/models/{repo}/tree/"):
                        tree = [{"type": "file", "path": f, "size": (folder / f).stat().st_size, "oid": "0"}
                                for f in files]
                        return self.reply(200, json.dumps(tree).encode(), {"Content-Type": "application/json"})
                    if path.startswith(f"/api/models/{repo}"):
                        info = {"id": repo, "sha": hub.commit(repo), "siblings": [{"rfilename": f} for f in files]}
                        return self.reply(200, json.dumps(info).encode(), {"Content-Type": "application/json"})
                    if path.startswith(f"/{repo}/resolve/"):
                        revision, _, name = path[len(f"/{repo}/resolve/"):].partition("/")
                        data = (folder / name).read_bytes()
                        hub.served.append((repo, revision, name))
                        return self.reply(200, data, {"ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                                                      "X-Repo-Commit": hub.commit(repo)})
                self.reply(404, b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound"})

            do_HEAD = do_GET

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @staticmethod
    def commit(repo: str) -> str:
        return hashlib.sha1(repo.encode()).hexdigest()

    def files(self, repo: str) -> set[str]:
        return {name for served_repo, _, name in self.served if served_repo == repo}


def use_endpoint(monkeypatch, endpoint: str) -> None:
    """Points huggingface_hub at `endpoint` (it reads HF_ENDPOINT once, at import, so its constants are set)."""
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        endpoint + "/{repo_id}/resolve/{revision}/{filename}")
