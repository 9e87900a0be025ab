"""Pulling models: resumable, verified before use, and never loadable when partial or corrupt.

A real HTTP server on loopback serves the file (with Range support, and a switch that cuts a
download halfway); the node's pull code is what runs, in-process and through `swarm-node models`.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from nova_swarm.broker.contract.errors import ConfigError
from nova_swarm.node.cli import resolve_model
from nova_swarm.node.models import ModelCache, pull

from .conftest import BIN

BLOB = os.urandom(3 * 2**20 + 12345)
BLOB_SHA = hashlib.sha256(BLOB).hexdigest()


class Server:
    def __init__(self) -> None:
        self.cut_after: int | None = None  # bytes to send before dropping the connection
        self.ranges: list[str | None] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
                server.ranges.append(self.headers.get("Range"))
                start = 0
                if (rng := self.headers.get("Range")) is not None:
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                    if start >= len(BLOB):
                        self.send_response(416)
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(BLOB) - 1}/{len(BLOB)}")
                else:
                    self.send_response(200)
                body = BLOB[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if server.cut_after is not None:
                    self.wfile.write(body[: server.cut_after])
                    self.wfile.flush()
                    self.connection.shutdown(2)  # the phone lost Wi-Fi
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/models/tiny.gguf"


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server()
    thread = threading.Thread(target=s.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


def test_an_interrupted_download_resumes_and_is_verified(server: Server, tmp_path: Path) -> None:
    cache = ModelCache(tmp_path / "cache")
    server.cut_after = 2**20
    with pytest.raises(ConfigError, match="run the same pull again to resume"):
        pull(server.url, cache=cache, sha256=BLOB_SHA)
    assert cache.list() == [] and cache.find("tiny") is None  # a partial file is never a model
    part = cache.root / "tiny.gguf.part"
    assert part.stat().st_size == 2**20

    server.cut_after = None
    seen: list[tuple[int, int | None]] = []
    model = pull(server.url, cache=cache, sha256=BLOB_SHA, progress=lambda d, t: seen.append((d, t)))
    assert server.ranges == [None, f"bytes={2**20}-"]  # the second request picked up where the first stopped
    assert model.path.read_bytes() == BLOB and model.sha256 == BLOB_SHA
    assert seen[-1] == (len(BLOB), len(BLOB))
    assert not part.exists()
    assert [m.name for m in cache.list()] == ["tiny"]
    assert resolve_model("tiny", cache) == model.path
    # Pulling again is a no-op: nothing is downloaded.
    assert pull(server.url, cache=cache, sha256=BLOB_SHA) == model and len(server.ranges) == 2


def test_a_wrong_checksum_is_refused_and_leaves_nothing_loadable(server: Server, tmp_path: Path) -> None:
    cache = ModelCache(tmp_path / "cache")
    wrong = "0" * 64
    with pytest.raises(ConfigError, match=f"checksum mismatch for tiny: expected sha256 {wrong}, got {BLOB_SHA}"):
        pull(server.url, cache=cache, sha256=wrong)
    assert list(cache.root.iterdir()) == []
    with pytest.raises(ConfigError, match="no model 'tiny'"):
        resolve_model("tiny", cache)


def test_a_damaged_cached_file_is_no_longer_offered(server: Server, tmp_path: Path) -> None:
    cache = ModelCache(tmp_path / "cache")
    model = pull(server.url, cache=cache, sha256=BLOB_SHA)
    with model.path.open("ab") as fh:
        fh.write(b"junk")
    assert cache.list() == []


def test_bad_requests_get_clear_errors(tmp_path: Path) -> None:
    cache = ModelCache(tmp_path / "cache")
    with pytest.raises(ConfigError, match="give --sha256 for a URL"):
        pull("http://127.0.0.1:9/x.gguf", cache=cache)
    with pytest.raises(ConfigError, match="unknown model 'no-such-model'"):
        pull("no-such-model", cache=cache)
    with pytest.raises(ConfigError, match="not a sha256"):
        pull("http://127.0.0.1:9/x.gguf", cache=cache, sha256="abc")
    with pytest.raises(ConfigError, match="cannot reach"):
        pull("http://127.0.0.1:9/x.gguf", cache=cache, sha256=BLOB_SHA)


def test_swarm_node_models_pull_and_list(server: Server, tmp_path: Path) -> None:
    env = {**os.environ, "NOVA_SWARM_MODELS": str(tmp_path / "cache")}
    out = subprocess.run(
        [str(BIN / "swarm-node"), "models", "pull", server.url, "--sha256", BLOB_SHA],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    assert f"tiny: verified sha256 {BLOB_SHA}" in out.stdout and "MB" in out.stderr  # the progress bar
    listed = subprocess.run(
        [str(BIN / "swarm-node"), "models", "list", "--json"], capture_output=True, text=True, timeout=60, env=env
    )
    assert [m["name"] for m in json.loads(listed.stdout)["models"]] == ["tiny"]
    bad = subprocess.run(
        [str(BIN / "swarm-node"), "models", "pull", server.url, "--sha256", "f" * 64, "--name", "other"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert bad.returncode == 2 and "checksum mismatch" in bad.stderr and "Traceback" not in bad.stderr


def test_the_catalogue_pins_the_bundled_model_exactly() -> None:
    from nova_swarm.node.models import CATALOGUE, bundled_model, sha256_file

    entry = CATALOGUE["smollm2-135m-instruct-q4_1"]
    path = bundled_model()
    assert (path.stat().st_size, sha256_file(path)) == (entry.size_bytes, entry.sha256)
    assert all(e.url.startswith("https://huggingface.co/") and len(e.sha256) == 64 for e in CATALOGUE.values())
