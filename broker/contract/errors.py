"""The swarm's exceptions, and the stable error codes that travel on the wire.

    SwarmError
    ├── ConfigError          bad flags, a missing config directory, a malformed broker URL
    ├── ConnectionLost       the broker refused us or went away (translated from aiomqtt/paho)
    ├── DiscoveryError       mDNS found no matching swarm, or could not run (translated from zeroconf)
    ├── ProtocolError        a message on the wire that breaks the contract
    ├── RequestFailed        a request ended in an error reply; carries its ErrorCode
    │   └── EngineError      the inference engine failed (translated from llama-cpp)
    └── UpdateRefused        a model pin or node bundle a node will not apply, and why
        └── SignatureError   unsigned, or not signed by the hub key the node trusts

Foreign exceptions are translated at one boundary each: ``connection.py`` for MQTT,
``messages.py`` for pydantic, ``discovery.py`` for zeroconf, ``node/llama.py`` for llama-cpp,
``signing.py`` for cryptography.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    """Codes a client can switch on. Never renumber or rename: they are part of the contract."""

    BAD_JSON = "bad_json"
    BAD_ENCODING = "bad_encoding"
    INVALID_REQUEST = "invalid_request"
    UNKNOWN_FIELD = "unknown_field"
    EMPTY_PROMPT = "empty_prompt"
    PROMPT_TOO_LARGE = "prompt_too_large"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    MAX_TOKENS_TOO_LARGE = "max_tokens_too_large"
    FANOUT_TOO_LARGE = "fanout_too_large"
    RATE_LIMITED = "rate_limited"
    HUB_BUSY = "hub_busy"
    BAD_REPLY_TO = "bad_reply_to"
    UNKNOWN_MODEL = "unknown_model"
    NO_ELIGIBLE_NODES = "no_eligible_nodes"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    NODE_BUSY = "node_busy"
    NODE_STOPPING = "node_stopping"
    NODE_PAUSED = "node_paused"
    NODE_LOST = "node_lost"
    CANCELLED = "cancelled"
    ENGINE_ERROR = "engine_error"
    HUB_STOPPING = "hub_stopping"
    INTERNAL_ERROR = "internal_error"
    #: the answer broke the request's JSON schema (or a tool's parameters) on every node tried
    INVALID_OUTPUT = "invalid_output"
    #: the request needs something no online node can do (embeddings, say)
    UNSUPPORTED = "unsupported"
    #: the requested model needs more RAM than any node that has it can give
    MODEL_TOO_LARGE = "model_too_large"


#: Errors after which the hub may try the same request on another node.
RETRYABLE = frozenset(
    {
        ErrorCode.NODE_BUSY,
        ErrorCode.NODE_STOPPING,
        ErrorCode.NODE_PAUSED,
        ErrorCode.NODE_LOST,
        ErrorCode.ENGINE_ERROR,
        ErrorCode.DEADLINE_EXCEEDED,
        ErrorCode.INVALID_OUTPUT,
        ErrorCode.MODEL_TOO_LARGE,
    }
)


class SwarmError(Exception):
    """Root of every error nova-swarm raises on purpose."""


class ConfigError(SwarmError):
    """The configuration cannot work: fix the flag or file named in the message."""


class ConnectionLost(SwarmError):
    """The broker refused the connection or dropped it."""


class DiscoveryError(SwarmError):
    """No swarm by that name and key answered on the LAN, or mDNS could not run here."""


class ProtocolError(SwarmError):
    """A message broke the wire contract."""


class RequestFailed(SwarmError):
    """A request ended with an error reply."""

    def __init__(self, code: ErrorCode, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s


class EngineError(RequestFailed):
    """The inference engine could not produce an answer."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.ENGINE_ERROR, message)


class UpdateRefused(SwarmError):
    """A node will not apply a model pin or bundle; the message is what its status reports."""


class SignatureError(UpdateRefused):
    """A manifest is unsigned, malformed, or does not verify with the hub's key."""
