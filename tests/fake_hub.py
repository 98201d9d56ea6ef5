"""A local stand-in for the Hub endpoints huggingface_hub uses to create a repo and commit files, on 127.0.0.1."""

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeHub:
    """Repos with owners, tokens with users, the committed files; `drop_commits` hangs up on that many commits."""

    def __init__(self, tokens: dict[str, str]):
        self.tokens = tokens
        self.repos: dict[str, dict] = {}
        self.drop_commits = 0
        self.unknown: list[str] = []
        self.validated: list = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _user(self):
                header = self.headers.get("authorization", "")
                return hub.tokens.get(header.removeprefix("Bearer ").strip())

            def _reply(self, status, payload):
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("content-length", 0)))

            def do_POST(self):  # noqa: N802
                body = self._body()
                if self.path.split("?")[0] == "/api/validate-yaml":  # checks a README's front matter
                    import yaml

                    content = json.loads(body)["content"]
                    try:
                        front = content.split("---")[1] if content.startswith("---") else ""
                        hub.validated.append(yaml.safe_load(front))
                        return self._reply(200, {"errors": [], "warnings": []})
                    except yaml.YAMLError as error:
                        return self._reply(400, {"error": f"Invalid YAML: {error}"})
                user = self._user()
                if user is None:
                    return self._reply(401, {"error": "Invalid credentials in Authorization header"})
                path = self.path.split("?")[0]
                if path == "/api/repos/create":
                    request = json.loads(body)
                    repo_id = f"{request.get('organization') or user}/{request['name']}"
                    if repo_id in hub.repos:
                        return self._reply(409, {"error": "You already created this model repo", "url": f"{hub.url}/{repo_id}"})
                    hub.repos[repo_id] = {"owner": repo_id.split("/")[0], "files": {}, "private": request.get("private")}
                    return self._reply(200, {"url": f"{hub.url}/{repo_id}"})
                parts = path.split("/")  # /api/models/{ns}/{name}/{action}/{revision}
                if len(parts) >= 7 and parts[1] == "api" and parts[2] == "models":
                    repo_id, action = f"{parts[3]}/{parts[4]}", parts[5]
                    repo = hub.repos.get(repo_id)
                    if repo is None:
                        return self._reply(404, {"error": "Repository not found"})
                    if repo["owner"] != user:
                        return self._reply(403, {"error": "You don't have the rights to write to this repo"})
                    if action == "preupload":
                        files = json.loads(body)["files"]
                        return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                                            "shouldIgnore": False} for f in files]})
                    if action == "commit":
                        if hub.drop_commits:
                            hub.drop_commits -= 1
                            self.close_connection = True
                            return  # hang up without an answer, as a dropped connection does
                        for line in body.decode().splitlines():
                            item = json.loads(line)
                            if item["key"] == "file":
                                value = item["value"]
                                repo["files"][value["path"]] = base64.b64decode(value["content"])
                        return self._reply(200, {"commitUrl": f"{hub.url}/{repo_id}/commit/1", "commitOid": "1" * 40})
                hub.unknown.append(f"POST {self.path}")
                return self._reply(404, {"error": "not found"})

            def do_GET(self):  # noqa: N802
                hub.unknown.append(f"GET {self.path}")
                return self._reply(404, {"error": "not found"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
