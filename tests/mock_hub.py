"""A small local HTTP mock of the Hugging Face Hub API, enough for `create_repo`, `upload_folder` and downloads.

The endpoints are the ones `huggingface_hub` 2.4 calls (read in its sources: `hf_api.create_repo`,
`_commit_api._fetch_upload_modes` / `_send_commit`, `lfs.post_lfs_batch_info` / `lfs_upload`,
`_upload_pipeline`, `file_download.get_hf_file_metadata`, `hf_api.list_repo_tree` / `model_info` /
`_validate_yaml`) and that `transformers.from_pretrained` reaches through them:

    POST /api/repos/create                               create a model repository (409 if it exists)
    POST /api/validate-yaml                              README.md metadata check (YAML mapping, valid model-index)
    GET  /api/agent-harnesses                            the client's user-agent registry (served empty)
    POST /api/models/{repo}/preupload/{rev}              upload mode per file: "lfs" for weights, else "regular"
    POST /{repo}.git/info/lfs/objects/batch              LFS "basic" transfer: where to PUT each object
    PUT  {storage}/lfs/{oid}                             the object itself (sha256 checked), on a second server
    POST /{repo}.git/info/lfs/objects/verify             the object arrived
    POST /api/models/{repo}/commit/{rev}                 NDJSON commit: header, file (base64), lfsFile, deletions
    GET  /api/models/{repo}[/revision/{rev}]             model info (sha, siblings)
    GET  /api/models/{repo}/tree/{rev}[/{path}]          file listing
    HEAD|GET /{repo}/resolve/{rev}/{path}                files; LFS files redirect to the storage server

Files are never written to disk. Xet storage is out of scope: with `hf_xet` installed, `upload_folder` sends "lfs"
files through Xet, so a test either disables Xet (`huggingface_hub.constants.HF_HUB_DISABLE_XET = True`: LFS basic
transfer) or starts the mock with `lfs_suffixes=()` (every file "regular", committed inline). Requests that match no
route are answered 404 and recorded in `unknown_requests`, so a test can assert the mock covered every call.

Bounded: bodies above `max_body_bytes` are refused, and the servers stop by themselves after `max_lifetime_s` even
if `stop()` (or the `with` block's exit) never runs.
"""

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

REPO = r"(?P<repo>[\w.-]+(?:/[\w.-]+)?)"
DEFAULT_TOKEN = "hf_mock_token_for_tests"


def git_blob_id(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class StoredFile:
    content: bytes
    lfs_oid: str | None = None  # sha256 when the file was uploaded through LFS

    @property
    def oid(self) -> str:
        """What the preupload endpoint reports and the client compares with its local oid."""
        return self.lfs_oid or git_blob_id(self.content)


@dataclass
class Commit:
    oid: str
    files: dict[str, StoredFile]


@dataclass
class Repo:
    repo_id: str
    private: bool
    commits: list[Commit] = field(default_factory=list)

    def at(self, revision: str) -> Commit | None:
        if revision == "main":
            return self.commits[-1]
        return next((commit for commit in self.commits if commit.oid == revision), None)


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, commit: str | None = None,
                 payload: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.commit, self.payload = status, code, commit, payload or {}


class MockHub:
    """`with MockHub() as hub:` serves `hub.endpoint`; repositories live in `hub.repos`."""

    def __init__(self, *, token: str = DEFAULT_TOKEN, lfs_suffixes: tuple[str, ...] = (".safetensors", ".bin"),
                 max_body_bytes: int = 64 * 2**20, max_lifetime_s: float = 300.0):
        self.token = token
        self.lfs_suffixes = lfs_suffixes
        self.max_body_bytes = max_body_bytes
        self.max_lifetime_s = max_lifetime_s
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.requests: list[tuple[str, str, int]] = []
        self.unknown_requests: list[tuple[str, str]] = []
        self.lock = threading.RLock()
        self._servers: list[ThreadingHTTPServer] = []
        self._timer: threading.Timer | None = None

    # ---- lifecycle -------------------------------------------------------------------------------------------------
    def start(self) -> "MockHub":
        for role in ("api", "storage"):
            server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self, role))
            server.daemon_threads = True
            threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
            self._servers.append(server)
        self.endpoint = f"http://127.0.0.1:{self._servers[0].server_port}"
        self.storage_endpoint = f"http://127.0.0.1:{self._servers[1].server_port}"
        self._timer = threading.Timer(self.max_lifetime_s, self.stop)
        self._timer.daemon = True
        self._timer.start()
        return self

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for server in self._servers:
            server.shutdown()
            server.server_close()
        self._servers.clear()

    def __enter__(self) -> "MockHub":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    # ---- state helpers ---------------------------------------------------------------------------------------------
    def repo(self, repo_id: str) -> Repo:
        if repo_id not in self.repos:
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return self.repos[repo_id]

    def commit_at(self, repo_id: str, revision: str) -> Commit:
        commit = self.repo(repo_id).at(unquote(revision))
        if commit is None:
            raise HubError(404, f"Revision {revision} not found in {repo_id}", "RevisionNotFound")
        return commit

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The content of every file of `repo_id` at `revision`, for tests."""
        return {path: stored.content for path, stored in self.commit_at(repo_id, revision).files.items()}


# ---- routes ----------------------------------------------------------------------------------------------------------
def _create_repo(hub: MockHub, request) -> tuple[int, dict]:
    body = request.json()
    name, namespace = body.get("name"), body.get("organization") or "mock-user"
    if not isinstance(name, str) or not re.fullmatch(r"[\w.-]+", name):
        raise HubError(400, f"Invalid repository name {name!r}")
    if body.get("type", "model") != "model":
        raise HubError(400, "This mock hosts model repositories only")
    repo_id = f"{namespace}/{name}"
    if repo_id in hub.repos:
        # Like the Hub, the conflict still carries the URL: `create_repo(exist_ok=True)` returns it.
        raise HubError(409, "You already created this model repo", payload={"url": f"{hub.endpoint}/{repo_id}"})
    initial = Commit(hashlib.sha1(f"init {repo_id}".encode()).hexdigest(), {})
    hub.repos[repo_id] = Repo(repo_id, private=body.get("visibility") == "private", commits=[initial])
    return 200, {"url": f"{hub.endpoint}/{repo_id}", "name": repo_id, "id": repo_id}


def _validate_yaml(hub: MockHub, request) -> tuple[int, dict]:
    content = request.json().get("content", "")
    match = re.match(r"---\n(.*?)\n---\n", content, flags=re.DOTALL)
    errors = []
    try:
        metadata = yaml.safe_load(match.group(1)) if match else {}
        if not isinstance(metadata, dict):
            errors.append("metadata must be a YAML mapping")
        elif "model-index" in metadata:
            from huggingface_hub.repocard_data import model_index_to_eval_results

            model_index_to_eval_results(metadata["model-index"])
    except (yaml.YAMLError, KeyError, TypeError, ValueError) as error:
        errors.append(f"invalid metadata: {error}")
    return (400 if errors else 200), {"errors": [{"message": m} for m in errors], "warnings": []}


def _agent_harnesses(hub: MockHub, request) -> tuple[int, dict]:
    return 200, {"standardEnvVars": [], "harnesses": {}}  # the client's user-agent registry: empty, nothing to detect


def _preupload(hub: MockHub, request, repo: str, rev: str) -> tuple[int, dict]:
    files = hub.commit_at(repo, rev).files
    answer = []
    for item in request.json()["files"]:
        mode = "lfs" if item["path"].endswith(hub.lfs_suffixes) and item["size"] > 0 else "regular"
        existing = files.get(item["path"])
        answer.append({"path": item["path"], "uploadMode": mode, "shouldIgnore": False,
                       "oid": existing.oid if existing is not None else None})
    return 200, {"files": answer, "commitOid": hub.commit_at(repo, rev).oid}


def _lfs_batch(hub: MockHub, request, repo: str) -> tuple[int, dict]:
    hub.repo(repo)
    body = request.json()
    if body.get("operation") != "upload" or "basic" not in body.get("transfers", ["basic"]):
        raise HubError(400, "This mock supports LFS uploads with the basic transfer only")
    objects = []
    for obj in body["objects"]:
        entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
        if obj["oid"] not in hub.lfs_objects:  # no actions: the object is already stored
            entry["actions"] = {
                "upload": {"href": f"{hub.storage_endpoint}/lfs/{obj['oid']}", "header": {}},
                "verify": {"href": f"{hub.endpoint}/{repo}.git/info/lfs/objects/verify", "header": {}},
            }
        objects.append(entry)
    return 200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"}


def _lfs_verify(hub: MockHub, request, repo: str) -> tuple[int, dict]:
    hub.repo(repo)
    body = request.json()
    stored = hub.lfs_objects.get(body.get("oid"))
    if stored is None or len(stored) != body.get("size"):
        raise HubError(400, f"LFS object {body.get('oid')} was not uploaded (or has another size)")
    return 200, {}


def _lfs_put(hub: MockHub, request, oid: str) -> tuple[int, dict]:
    content = request.body()
    if hashlib.sha256(content).hexdigest() != oid:
        raise HubError(400, "The uploaded content does not match its sha256 oid")
    hub.lfs_objects[oid] = content
    return 200, {}


def _apply_operation(hub: MockHub, files: dict[str, StoredFile], key: str, value: dict) -> None:
    if key == "file":
        if value.get("encoding") != "base64":
            raise HubError(400, "Inline files must be base64")
        files[value["path"]] = StoredFile(base64.b64decode(value["content"]))
    elif key == "lfsFile":
        content = hub.lfs_objects.get(value["oid"])
        if content is None or len(content) != value["size"]:
            raise HubError(422, f"LFS object {value['oid']} of {value['path']} was never uploaded")
        files[value["path"]] = StoredFile(content, lfs_oid=value["oid"])
    elif key == "deletedFile":
        if files.pop(value["path"], None) is None:
            raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
    elif key == "deletedFolder":
        prefix = value["path"].rstrip("/") + "/"
        for path in [p for p in files if p.startswith(prefix)]:
            del files[path]
    else:
        raise HubError(400, f"Unknown commit operation {key!r}")


def _commit(hub: MockHub, request, repo: str, rev: str) -> tuple[int, dict]:
    if request.query.get("create_pr"):
        raise HubError(400, "This mock does not support pull requests")
    parent = hub.commit_at(repo, rev)
    lines = [json.loads(line) for line in request.body().splitlines() if line.strip()]
    if not lines or lines[0].get("key") != "header":
        raise HubError(400, "A commit starts with its header line")
    files = dict(parent.files)
    for line in lines[1:]:
        _apply_operation(hub, files, line["key"], line["value"])
    digest = hashlib.sha1(parent.oid.encode() + json.dumps(lines[0]["value"]).encode())
    for path in sorted(files):
        digest.update(path.encode() + files[path].oid.encode())
    commit = Commit(digest.hexdigest(), files)
    hub.repo(repo).commits.append(commit)
    return 200, {"commitUrl": f"{hub.endpoint}/{repo}/commit/{commit.oid}", "commitOid": commit.oid,
                 "pullRequestUrl": None, "success": True}


def _model_info(hub: MockHub, request, repo: str, rev: str = "main") -> tuple[int, dict]:
    commit = hub.commit_at(repo, rev)
    info = {"_id": repo, "id": repo, "modelId": repo, "sha": commit.oid, "private": hub.repo(repo).private,
            "siblings": [{"rfilename": path} for path in sorted(commit.files)], "tags": [], "downloads": 0,
            "likes": 0, "library_name": "transformers"}
    return 200, info


def _tree_entry(path: str, stored: StoredFile) -> dict:
    entry = {"type": "file", "path": path, "size": len(stored.content), "oid": git_blob_id(stored.content)}
    if stored.lfs_oid:
        entry["lfs"] = {"oid": stored.lfs_oid, "size": len(stored.content), "pointerSize": 134}
    return entry


def _tree(hub: MockHub, request, repo: str, rev: str, path: str = "") -> tuple[int, list]:
    files = hub.commit_at(repo, rev).files
    prefix = unquote(path).strip("/")
    recursive = request.query.get("recursive", "false").lower() == "true"
    inside = {p: s for p, s in files.items() if not prefix or p.startswith(prefix + "/")}
    if prefix and not inside:
        raise HubError(404, f"{prefix} does not exist in {repo}", "EntryNotFound")
    entries, folders = [], set()
    for file_path, stored in sorted(inside.items()):
        rest = file_path[len(prefix) + 1:] if prefix else file_path
        if recursive or "/" not in rest:
            entries.append(_tree_entry(file_path, stored))
        if "/" in rest:
            parts = rest.split("/")[:-1] if recursive else rest.split("/")[:1]
            for depth in range(1, len(parts) + 1):
                folders.add("/".join(filter(None, [prefix, *parts[:depth]])))
    entries += [{"type": "directory", "path": name, "oid": git_blob_id(name.encode())} for name in sorted(folders)]
    return 200, entries


class _Request:
    def __init__(self, handler: BaseHTTPRequestHandler, max_body_bytes: int):
        self.handler = handler
        split = urlsplit(handler.path)
        self.path = split.path
        self.query = {key: values[-1] for key, values in parse_qs(split.query).items()}
        self.max_body_bytes = max_body_bytes
        self._body: bytes | None = None

    def body(self) -> bytes:
        """The request body, read once: with a Content-Length or in chunked transfer encoding (streamed uploads)."""
        if self._body is None:
            if self.handler.headers.get("Transfer-Encoding", "").lower() == "chunked":
                self._body = self._read_chunked()
            else:
                length = int(self.handler.headers.get("Content-Length") or 0)
                if length > self.max_body_bytes:
                    raise HubError(413, f"Request body of {length} bytes is above the mock's limit")
                self._body = self.handler.rfile.read(length)
        return self._body

    def unread_body(self) -> bool:
        headers = self.handler.headers
        has_body = int(headers.get("Content-Length") or 0) > 0 or "chunked" in headers.get("Transfer-Encoding", "")
        return has_body and self._body is None

    def _read_chunked(self) -> bytes:
        chunks, total = [], 0
        while size := int(self.handler.rfile.readline().split(b";")[0].strip() or b"0", 16):
            total += size
            if total > self.max_body_bytes:
                raise HubError(413, "Request body is above the mock's limit")
            chunks.append(self.handler.rfile.read(size))
            self.handler.rfile.readline()  # the line break after each chunk
        self.handler.rfile.readline()  # the blank line after the last chunk
        return b"".join(chunks)

    def json(self):
        try:
            return json.loads(self.body() or b"{}")
        except json.JSONDecodeError as error:
            raise HubError(400, f"Invalid JSON body: {error}") from error


# (method, server role, pattern, handler, needs a write token)
ROUTES = [
    ("POST", "api", r"/api/repos/create", _create_repo, True),
    ("POST", "api", r"/api/validate-yaml", _validate_yaml, False),
    ("GET", "api", r"/api/agent-harnesses", _agent_harnesses, False),
    ("POST", "api", rf"/api/models/{REPO}/preupload/(?P<rev>[^/]+)", _preupload, True),
    ("POST", "api", rf"/api/models/{REPO}/commit/(?P<rev>[^/]+)", _commit, True),
    ("GET", "api", rf"/api/models/{REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?", _tree, False),
    ("GET", "api", rf"/api/models/{REPO}/revision/(?P<rev>[^/]+)", _model_info, False),
    ("GET", "api", rf"/api/models/{REPO}", _model_info, False),
    ("POST", "api", rf"/{REPO}\.git/info/lfs/objects/batch", _lfs_batch, True),
    ("POST", "api", rf"/{REPO}\.git/info/lfs/objects/verify", _lfs_verify, True),
    ("PUT", "storage", r"/lfs/(?P<oid>[0-9a-f]{64})", _lfs_put, False),
]
RESOLVE = re.compile(rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)")
STORAGE_GET = re.compile(r"/lfs/(?P<oid>[0-9a-f]{64})")


def _make_handler(hub: MockHub, role: str) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format, *args) -> None:  # the test output stays readable
            pass

        def _send(self, status: int, payload=None, headers: dict | None = None, body: bytes | None = None) -> None:
            if body is None:
                body = b"" if payload is None else json.dumps(payload).encode()
            self.send_response(status)
            headers = {"Content-Type": "application/json", **(headers or {})}
            for key, value in headers.items():
                self.send_header(key, value)
            if "Content-Length" not in headers:
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
            with hub.lock:
                hub.requests.append((self.command, self.path, status))

        def _authorised(self) -> bool:
            return self.headers.get("Authorization") == f"Bearer {hub.token}"

        def _dispatch(self) -> None:
            request = _Request(self, hub.max_body_bytes)
            try:
                with hub.lock:  # one request at a time: the state is plain dicts
                    self._route(request)
            except HubError as error:
                headers = {"X-Error-Message": str(error)}
                if request.unread_body():  # it must not be parsed as the next request: close this connection
                    headers["Connection"] = "close"
                if error.code:
                    headers["X-Error-Code"] = error.code
                if error.commit:
                    headers["X-Repo-Commit"] = error.commit
                self._send(error.status, {"error": str(error), **error.payload}, headers)
            except Exception as error:  # a bug of the mock: answer, and make it visible to the test
                hub.unknown_requests.append((self.command, f"{self.path} -> {type(error).__name__}: {error}"))
                self._send(500, {"error": f"mock failure: {error}"}, {"Connection": "close"})

        def _route(self, request: _Request) -> None:
            if role == "api" and self.command in ("GET", "HEAD") and (match := RESOLVE.fullmatch(request.path)):
                return self._resolve(**match.groupdict())
            if role == "storage" and self.command in ("GET", "HEAD") and (match := STORAGE_GET.fullmatch(request.path)):
                content = hub.lfs_objects.get(match["oid"])
                if content is None:
                    raise HubError(404, "No such object")
                return self._send(200, body=content, headers={"Content-Type": "application/octet-stream"})
            for method, route_role, pattern, function, needs_token in ROUTES:
                match = re.fullmatch(pattern, request.path)
                if method == self.command and route_role == role and match:
                    if needs_token and not self._authorised():
                        raise HubError(401, "Invalid credentials in Authorization header")
                    arguments = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                    status, payload = function(hub, request, **arguments)
                    return self._send(status, payload)
            hub.unknown_requests.append((self.command, self.path))
            raise HubError(404, f"The mock Hub has no route for {self.command} {request.path}")

        def _resolve(self, repo: str, rev: str, path: str) -> None:
            commit = hub.commit_at(unquote(repo), rev)
            stored = commit.files.get(unquote(path))
            if stored is None:
                raise HubError(404, f"Entry {path} not found", "EntryNotFound", commit=commit.oid)
            headers = {"X-Repo-Commit": commit.oid, "Content-Type": "application/octet-stream"}
            if stored.lfs_oid is None:
                headers["ETag"] = f'"{git_blob_id(stored.content)}"'
                return self._send(200, body=stored.content, headers=headers)
            # Like the Hub: a redirect to the storage host, with the file's metadata on the redirect itself.
            headers.update({"Location": f"{hub.storage_endpoint}/lfs/{stored.lfs_oid}",
                            "X-Linked-Etag": f'"{stored.lfs_oid}"', "X-Linked-Size": str(len(stored.content)),
                            "ETag": f'"{git_blob_id(stored.content)}"'})
            self._send(302, headers=headers)

        do_GET = do_HEAD = do_POST = do_PUT = _dispatch

        def do_DELETE(self) -> None:
            hub.unknown_requests.append((self.command, self.path))
            self._send(405, {"error": "not supported by the mock"})

    return Handler


__all__ = ["DEFAULT_TOKEN", "MockHub", "git_blob_id"]
