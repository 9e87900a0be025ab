"""Every payload on the wire, as frozen pydantic models parsed once at the edge.

MQTT 3.1.1 has no message properties, so everything a request needs (id, reply topic, deadline,
timestamps) travels in this JSON envelope. ``topics.md`` shows an example of each model.
Unknown fields are refused (``extra="forbid"``) so a typo in a field name is an error, not a
silently ignored option.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum
from typing import Annotated, Any, Literal, TypeVar

from packaging.version import InvalidVersion
from packaging.version import Version as PackagingVersion
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from nova_swarm.broker.contract.errors import ConfigError, ErrorCode, ProtocolError

#: Request ids become log keys and correlation values; keep them printable and short.
RequestId = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:-]{1,128}$")]
NodeId = Annotated[str, Field(pattern=r"^[a-z0-9_-]{1,64}$")]
Tag = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")]
Strategy = Literal["race", "best_of_n"]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
#: PEP 440 versions, compared with ``packaging`` where they are used
Version = Annotated[str, Field(pattern=r"^[0-9][0-9A-Za-z.+!-]{0,63}$")]
#: the hub's default cap on fanout
MAX_FANOUT = 16


class Wire(BaseModel):
    # NaN and infinities would be written back as null and break the next read (the hub
    # stores announces and heartbeats): refuse them at the door.
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False, strict=True)

    def encode(self) -> bytes:
        return self.model_dump_json().encode()


#: a wire message, or a metrics payload (declared at the end of this module)
M = TypeVar("M", bound=BaseModel)


def decode(model: type[M], payload: bytes | str) -> M:
    """Parse one payload; the single place where pydantic's errors become ours."""
    try:
        return model.model_validate_json(payload)
    except ValidationError as exc:
        raise ProtocolError(f"invalid {model.__name__}: {describe(exc)}") from exc


def describe(exc: ValidationError) -> str:
    """A one-line, human-readable summary of a validation error."""
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err["loc"]) or "payload"
        parts.append(f"{where}: {err['msg']}")
    more = len(exc.errors()) - 5
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


# ---------------------------------------------------------------- requests and answers


#: a tool's or function's name, as OpenAI allows it
FunctionName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]


class FunctionCall(Wire):
    name: FunctionName
    #: JSON text, exactly as OpenAI sends it (a client parses it; it may not match the schema)
    arguments: str


class ToolCall(Wire):
    """One call the model wants made, in OpenAI's shape."""

    id: str = Field(min_length=1, max_length=128)
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(Wire):
    """One turn. ``assistant`` turns may carry ``tool_calls`` instead of text; a ``tool`` turn
    answers one of them by ``tool_call_id``."""

    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    tool_calls: list[ToolCall] | None = Field(default=None, max_length=64)
    tool_call_id: str | None = Field(default=None, max_length=128)
    name: str | None = Field(default=None, max_length=64)

    @model_validator(mode="after")
    def _shape(self) -> ChatMessage:
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("only an assistant message may carry tool_calls")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id it answers")
        return self

    def engine_dict(self) -> dict[str, Any]:
        """What a chat template takes: OpenAI's message shape, without the unset keys."""
        return self.model_dump(exclude_none=True)


class FunctionDef(Wire):
    name: FunctionName
    description: str | None = Field(default=None, max_length=4096)
    #: a JSON Schema for the arguments (checked by the hub at intake)
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool | None = None


class Tool(Wire):
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedFunction(Wire):
    name: FunctionName


class NamedToolChoice(Wire):
    type: Literal["function"] = "function"
    function: NamedFunction


#: OpenAI's ``tool_choice``: none, auto (the model decides), required (some tool), or one tool by name
ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class JsonSchemaFormat(Wire):
    name: str = Field(default="response", pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    #: the JSON Schema the answer must validate against (the node turns it into a grammar)
    # ``schema`` would shadow a BaseModel attribute: the field has another name, and the wire
    # spells it OpenAI's way both ways.
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None

    model_config = ConfigDict(
        frozen=True, extra="forbid", allow_inf_nan=False, strict=True, validate_by_name=True, serialize_by_alias=True
    )


class ResponseFormat(Wire):
    """OpenAI's ``response_format``: free text, any JSON object, or JSON matching a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_iff_json_schema(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("'json_schema' must be given exactly when type is 'json_schema'")
        return self

    def answer_schema(self) -> dict[str, Any] | None:
        """The JSON Schema an answer must match, or None for free text."""
        if self.type == "json_schema" and self.json_schema is not None:
            return self.json_schema.schema_
        if self.type == "json_object":
            return {"type": "object"}
        return None


class GenParams(Wire):
    """Sampling parameters. Nodes clamp ``max_tokens`` and ``temperature`` to their limits."""

    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = None
    stop: list[str] | None = Field(default=None, max_length=8)
    tags: list[Tag] = Field(default_factory=list, max_length=16)
    # llama.cpp's own sampling knobs (llama-server, Ollama's options). None: the engine's default;
    # older nodes never see them (the hub leaves None out of the task it sends).
    #: sample from the k likeliest tokens only (0: all of them; 1: greedy)
    top_k: int | None = Field(default=None, ge=0)
    #: drop tokens less likely than this share of the likeliest one's probability
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    #: above 1 makes repeating recent tokens less likely (1: off)
    repeat_penalty: float | None = Field(default=None, ge=0.0)
    #: locally typical sampling (1: off)
    typical_p: float | None = Field(default=None, gt=0.0, le=1.0)


class PromptRequest(Wire):
    """What a client publishes on the prompt topic (or plain text, which becomes ``prompt``)."""

    id: RequestId | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1, max_length=256)
    params: GenParams = Field(default_factory=GenParams)
    strategy: Strategy = "race"
    fanout: int = Field(default=1, ge=1)  # capped by the hub's limits (fanout_too_large)
    tags: list[Tag] = Field(default_factory=list, max_length=16)
    reply_to: str | None = Field(default=None, max_length=256)
    model: str | None = Field(default=None, max_length=128)
    timeout_s: float | None = Field(default=None, gt=0.0, le=3600.0)
    #: only nodes the owner marked trusted; nothing of it is kept on disk (no journal, no text)
    private: bool = False
    #: ``chat`` generates text; ``embed`` returns one vector per ``input`` text; ``complete``
    #: continues ``prompt`` as raw text, with no chat template (llama-server's ``/completion``)
    kind: Literal["chat", "embed", "complete"] = "chat"
    #: the texts to embed (``kind: "embed"`` only)
    input: list[str] | None = Field(default=None, min_length=1, max_length=256)
    #: tokens as they are generated, on the request's stream topic (``Topics.stream``)
    stream: bool = False
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = Field(default=None, min_length=1, max_length=64)
    tool_choice: ToolChoice | None = None
    #: add snippets from the hub's document folder as context (None: the hub's default)
    retrieval: bool | None = None
    #: best_of_n across models: the attempts go to these models in turn, so the reranker picks
    #: among different models' answers (instead of ``model``)
    models: list[Annotated[str, Field(min_length=1, max_length=128)]] | None = Field(
        default=None, min_length=2, max_length=16
    )
    #: best_of_n across models: the attempts go to as many different models as online nodes serve
    diverse: bool = False

    @model_validator(mode="after")
    def _across_models(self) -> PromptRequest:
        if self.models is None and not self.diverse:
            return self
        if self.strategy != "best_of_n":
            raise ValueError("'models' and 'diverse' are for best_of_n: the reranker picks among the models' answers")
        if self.model is not None or (self.models is not None and self.diverse):
            raise ValueError("give one of 'model', 'models' or 'diverse'")
        if self.models is not None:
            if len(set(self.models)) != len(self.models):
                raise ValueError("'models' names a model twice")
            if self.fanout < len(self.models):
                raise ValueError(f"'models' names {len(self.models)} models: 'fanout' must be at least that")
        return self

    @model_validator(mode="after")
    def _one_prompt(self) -> PromptRequest:
        if self.kind == "embed":
            if self.input is None or self.prompt is not None or self.messages is not None:
                raise ValueError("an embed request gives 'input' (a list of texts), not 'prompt' or 'messages'")
            if not all(text.strip() for text in self.input):
                raise ValueError("'input' has an empty text")
            if self.stream or self.tools or self.response_format is not None:
                raise ValueError("an embed request cannot stream, call tools or take a response_format")
            return self
        if self.input is not None:
            raise ValueError("'input' is for embed requests; a chat request gives 'prompt' or 'messages'")
        if self.kind == "complete":
            # The text goes to the model as it is: a blank line or an indent is a fair prefix
            # to continue, so only the empty text is refused.
            if not self.prompt or self.messages is not None:
                raise ValueError("a complete request gives 'prompt' (the text to continue), not 'messages'")
            if self.tools is not None or self.tool_choice is not None:
                raise ValueError("a complete request continues a text: it cannot call tools")
            if self.retrieval:
                raise ValueError("retrieval adds context to a chat; a complete request continues its text as it is")
            return self
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        if self.prompt is not None and not self.prompt.strip():
            raise ValueError("'prompt' is empty")
        if self.tool_choice is not None and not self.tools and self.tool_choice != "none":
            raise ValueError("'tool_choice' needs 'tools'")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tools:
            if self.tool_choice.function.name not in {t.function.name for t in self.tools}:
                raise ValueError(f"tool_choice names {self.tool_choice.function.name!r}, which is not in 'tools'")
        if self.tools and self.response_format is not None and self.response_format.type != "text":
            raise ValueError("give 'tools' or a JSON 'response_format', not both")
        return self

    def wants_json(self) -> dict[str, Any] | None:
        """The JSON Schema the answer must match, if the request asked for one."""
        return self.response_format.answer_schema() if self.response_format is not None else None

    def chat(self) -> list[ChatMessage]:
        if self.messages is not None:
            return list(self.messages)
        return [ChatMessage(role="user", content=self.prompt or "")]

    def all_tags(self) -> tuple[str, ...]:
        return tuple(sorted(set(self.tags) | set(self.params.tags)))

    def prompt_chars(self) -> int:
        if self.kind == "embed":
            return sum(len(text) for text in self.input or ())
        return sum(len(m.content) for m in self.chat())


class Usage(Wire):
    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)
    total_tokens: int = Field(ge=0)


class Timings(Wire):
    """Measured on the node: time waiting in its queue, to the first token, and generating."""

    queue_ms: float = Field(ge=0)
    ttft_ms: float | None = Field(default=None, ge=0)
    generate_ms: float = Field(ge=0)
    tokens_per_s: float | None = Field(default=None, ge=0)
    #: the node loaded the model for this task first, taking this long (None: it was in memory)
    load_ms: float | None = Field(default=None, ge=0)


class ErrorInfo(Wire):
    code: ErrorCode
    message: str
    retry_after_s: float | None = None


class Candidate(Wire):
    node_id: NodeId
    #: the model that wrote it (None from older nodes)
    model: str | None = None
    text: str
    score: float
    finish_reason: str | None
    usage: Usage | None
    timings: Timings | None


class Answer(Wire):
    """The hub's reply to a request that succeeded."""

    id: RequestId
    ok: Literal[True] = True
    text: str
    node_id: NodeId
    model: str
    finish_reason: str | None
    usage: Usage | None
    timings: Timings | None
    latency_ms: float
    strategy: Strategy
    attempts: int
    candidates: list[Candidate] = Field(default_factory=list)
    tool_calls: list[ToolCall] | None = None
    #: one vector per input text, for ``kind: "embed"`` (``text`` is empty then)
    embeddings: list[list[float]] | None = None


class ErrorReply(Wire):
    """The hub's reply to a request that failed: always sent, never silence."""

    id: str | None
    ok: Literal[False] = False
    error: ErrorInfo


def decode_reply(payload: bytes | str) -> Answer | ErrorReply:
    try:
        return Answer.model_validate_json(payload)
    except ValidationError:
        return decode(ErrorReply, payload)


# ---------------------------------------------------------------- hub <-> node


class Task(Wire):
    """One attempt at a request, sent to one node. ``timeout_s`` is relative: phones' clocks drift."""

    task_id: RequestId
    request_id: RequestId
    messages: list[ChatMessage]
    params: GenParams
    timeout_s: float = Field(gt=0)
    model: str | None = None
    kind: Literal["chat", "embed", "complete"] = "chat"
    input: list[str] | None = None
    #: the text to continue (``kind: "complete"`` only; ``messages`` is empty then)
    prompt: str | None = None
    #: send tokens on the node's stream topic as they come (``NodeChunk``)
    stream: bool = False
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None

    @model_validator(mode="after")
    def _prompt_iff_complete(self) -> Task:
        if (self.kind == "complete") != (self.prompt is not None):
            raise ValueError("'prompt' must be given exactly when kind is 'complete'")
        return self


class Cancel(Wire):
    task_id: RequestId
    reason: str


class TaskResult(Wire):
    task_id: RequestId
    request_id: RequestId
    node_id: NodeId
    ok: bool
    text: str = ""
    model: str | None = None
    finish_reason: str | None = None
    usage: Usage | None = None
    timings: Timings | None = None
    error: ErrorInfo | None = None
    tool_calls: list[ToolCall] | None = None
    embeddings: list[list[float]] | None = None
    #: joules the node's device used while it ran the task, by its energy source (``node/energy.py``);
    #: None: unknown (no readable source, a phone on its charger, or an older node)
    energy_j: float | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _error_iff_failed(self) -> TaskResult:
        if self.ok == (self.error is not None):
            raise ValueError("'error' must be set exactly when ok is false")
        return self


class FunctionDelta(Wire):
    name: str | None = None
    arguments: str = ""


class ToolCallDelta(Wire):
    """A piece of a streamed tool call, in OpenAI's shape: the first piece of call ``index``
    carries its id and name, later ones more of its arguments."""

    index: int = Field(ge=0)
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionDelta


class NodeChunk(Wire):
    """Node to hub: the next piece of a streamed task. ``seq`` counts from 0 within the task."""

    task_id: RequestId
    seq: int = Field(ge=0)
    text: str = ""
    tool_calls: list[ToolCallDelta] | None = None


class NodeProgress(Wire):
    """Node to hub, every ``Announce.progress_s`` while the node holds tasks (running or queued
    behind them): "still on these". Liveness, not content: the hub writes off an attempt whose
    node goes quiet, which a frozen or unplugged phone does without closing its socket."""

    node_id: NodeId
    tasks: list[RequestId] = Field(max_length=1024)


class StreamChunk(Wire):
    """Hub to client, on the request's stream topic: the next piece of the answer.

    ``seq`` counts from 0 over the whole stream, end included: a reader that sees a ``seq`` it
    already had has a duplicate (drop it); one past the next it expects has a gap. ``restart``
    means the node streaming the answer was lost and another starts over: drop what you had."""

    id: RequestId
    seq: int = Field(ge=0)
    done: Literal[False] = False
    node_id: NodeId
    text: str = ""
    tool_calls: list[ToolCallDelta] | None = None
    restart: bool = False


class StreamEnd(Wire):
    """The last message on a stream: how it ended. The full reply still goes to the reply topic."""

    id: RequestId
    seq: int = Field(ge=0)
    done: Literal[True] = True
    ok: bool
    node_id: NodeId | None = None
    model: str | None = None
    finish_reason: str | None = None
    usage: Usage | None = None
    timings: Timings | None = None
    error: ErrorInfo | None = None


def decode_stream(payload: bytes | str) -> StreamChunk | StreamEnd:
    try:
        return StreamChunk.model_validate_json(payload)
    except ValidationError:
        return decode(StreamEnd, payload)


class CancelRequest(Wire):
    """Client to hub: stop working on a request (a client that went away). Its id is the key."""

    id: RequestId
    reason: str = Field(default="cancelled by the client", max_length=256)


# ---------------------------------------------------------------- node presence


class NodeState(StrEnum):
    ONLINE = "online"
    PAUSED = "paused"
    OFFLINE = "offline"


#: ``stream``: tokens as they come; ``embed``: embedding vectors; ``json_schema``: answers
#: constrained to a schema; ``tools``: OpenAI-style tool calls; ``complete``: raw text
#: continuation (``kind: "complete"``)
Capability = Literal["stream", "embed", "json_schema", "tools", "complete"]


class ModelInfo(Wire):
    name: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size_bytes: int = Field(ge=0)
    ctx: int = Field(ge=1)
    #: for each of ``Announce.models`` (None in ``Announce.model``, and from older nodes): the
    #: RAM it takes once loaded (weights and contexts), whether it is in memory now, how long
    #: its last load took, and whether it fits the node's RAM at all
    needs_bytes: int | None = Field(default=None, ge=0)
    loaded: bool | None = None
    load_s: float | None = Field(default=None, ge=0)
    fits: bool | None = None


class Announce(Wire):
    """Retained: who the node is and what it can do."""

    node_id: NodeId
    model: ModelInfo
    threads: int = Field(ge=1)
    tokens_per_s: float = Field(ge=0)
    ram_total_mb: float | None
    device: Literal["phone", "laptop", "desktop", "server"]
    tags: list[Tag] = Field(default_factory=list)
    agent_version: str
    slots: int = Field(ge=1)
    queue_max: int = Field(ge=0)
    max_tokens: int = Field(ge=1)
    max_temperature: float = Field(ge=0)
    ts: float
    #: what the node's engine can do beyond plain chat (older nodes announce none of these)
    capabilities: list[Capability] = Field(default_factory=list)
    #: the node sends ``NodeProgress`` at least this often while it holds tasks (None: an older
    #: node that never does; the hub then judges its attempts by their deadlines alone)
    progress_s: float | None = Field(default=None, gt=0, le=60)
    #: every model the node can serve, when it serves more than one (empty: just ``model``).
    #: It loads one when a task needs it, evicting the least recently used within its RAM
    #: budget, and announces again whenever what is loaded changes; ``model`` is the one it
    #: used last.
    models: list[ModelInfo] = Field(default_factory=list, max_length=64)
    #: the most RAM the node lets its models take (None: not said; it then uses what is free)
    ram_budget_bytes: int | None = Field(default=None, ge=0)

    def served(self) -> list[ModelInfo]:
        """Every model the node can serve (``model`` alone for a one-model node)."""
        return self.models or [self.model]


class PinReport(Wire):
    """How a node stands with the swarm's model pin or bundle: what it was asked for, what came of it."""

    #: the bundle version, or the pinned model's name
    wanted: str = Field(max_length=128)
    outcome: Literal["fetching", "switching", "applied", "refused", "rolled_back", "unpinned"]
    reason: str | None = Field(default=None, max_length=1024)
    ts: float


class Status(Wire):
    """Retained, and the node's Last Will (``offline``)."""

    node_id: NodeId
    state: NodeState
    reason: str | None = None
    ts: float | None = None
    #: the node's answer to the retained bundle manifest and model pin (None: none seen yet)
    bundle: PinReport | None = None
    model_pin: PinReport | None = None


class Heartbeat(Wire):
    """Every few seconds. ``None`` means the value could not be read, never zero."""

    node_id: NodeId
    ts: float
    battery_pct: float | None
    charging: bool | None
    temp_c: float | None
    ram_free_mb: float | None
    load: float | None
    #: recent generation speed, from the node's last answers (its announce has the start-up profile)
    tokens_per_s: float | None
    busy: int = Field(ge=0)
    slots: int = Field(ge=1)
    queued: int = Field(ge=0)
    tokens_served: int = Field(ge=0)
    tasks_done: int = Field(ge=0)
    tasks_failed: int = Field(ge=0)
    #: the battery and thermal guard: paused now, and how often it has paused since start
    paused: bool = False
    pauses: int = Field(default=0, ge=0)
    #: models loaded since start because a task needed one that was not in memory
    swaps: int = Field(default=0, ge=0)


# ---------------------------------------------------------------- hub presence


class HubStatus(Wire):
    """Retained, and the hub's Last Will (``offline``)."""

    hub_id: str
    state: Literal["online", "offline"]
    ts: float | None = None
    version: str | None = None
    nodes_online: int = 0
    nodes_paused: int = 0
    nodes_offline: int = 0
    inflight: int = 0
    #: of those in flight, how many wait for a free node
    queued: int = 0
    answered: int = 0
    #: refused or failed; a request its client cancelled counts in ``cancelled`` instead
    failed: int = 0
    cancelled: int = 0
    started_at: float | None = None
    #: the hub's cap on tokens per answer: a request asks for at most this, and one that gives
    #: no ``max_tokens`` runs until the model stops, its context ends or this cap (None: an older hub)
    max_tokens: int | None = Field(default=None, ge=1)


class ServedModel(Wire):
    """A model a node can serve, as the node table shows it."""

    name: str
    #: in the node's memory now
    loaded: bool
    #: fits the node's RAM (False: announced, but too big for it)
    fits: bool = True
    needs_mb: float | None = None
    #: how long its last load took on that node
    load_s: float | None = None


class NodeRow(Wire):
    node_id: NodeId
    state: NodeState
    model: str | None
    tokens_per_s: float | None
    battery_pct: float | None
    charging: bool | None
    temp_c: float | None
    busy: int
    last_seen: float | None
    agent_version: str | None
    tags: list[str]
    #: why the node does not run the pinned bundle or model (None: it does, or nothing is pinned)
    lag: str | None = None
    #: energy per generated token over the node's recent answers (None: its energy is unknown)
    joules_per_token: float | None = None
    #: from the node's announce (None / empty: not announced yet): its model's context length,
    #: its cap on tokens per answer, and what its engine can do beyond plain chat
    ctx: int | None = Field(default=None, ge=1)
    max_tokens: int | None = Field(default=None, ge=1)
    capabilities: list[Capability] = Field(default_factory=list)
    #: every model the node can serve (``model`` is the one it used last), and how many times it
    #: loaded one because a task needed it
    models: list[ServedModel] = Field(default_factory=list)
    swaps: int = Field(default=0, ge=0)

    def served(self) -> list[ServedModel]:
        """Every model the node can serve (a row without ``models``: its ``model``, loaded)."""
        return self.models or ([ServedModel(name=self.model, loaded=True)] if self.model else [])


class NodeTable(Wire):
    """Retained: the hub's view of every node it knows, for ``swarm-hub nodes``."""

    ts: float
    nodes: list[NodeRow]


# ---------------------------------------------------------------- signed pins (retained)


#: The packages a node bundle carries: everything a node imports from nova-swarm, and nothing else.
BUNDLE_PACKAGES = ("broker", "node")
#: ...less these subpackages, which only a hub runs (the brokers it starts).
BUNDLE_LEAVES_OUT = ("broker/server",)


def parse_version(text: str) -> PackagingVersion:
    """A PEP 440 version, or ConfigError saying it is not one."""
    try:
        return PackagingVersion(text)
    except InvalidVersion as exc:
        raise ConfigError(f"{text!r} is not a version (PEP 440, like 0.2.0)") from exc


class BundleManifest(Wire):
    """The node code every node should run; travels signed (see ``signing.py``) on ``bundle``.

    The archive itself is ``chunks`` retained messages on ``bundle/chunk/{i}``, each
    ``chunk_bytes`` long but the last, each with its own sha256 so a node can tell a stale chunk
    from the current one.
    """

    kind: Literal["bundle"] = "bundle"
    swarm: str
    version: Version
    sha256: Sha256
    size_bytes: int = Field(ge=1)
    min_python: str = Field(pattern=r"^3\.[0-9]{1,2}$")
    chunk_bytes: int = Field(ge=1024)
    chunks: list[Sha256] = Field(min_length=1, max_length=4096)
    created: float


class PinnedModel(Wire):
    """One more model a pin asks nodes to serve (``ModelPin.more``), with the same fields."""

    name: str = Field(pattern=r"^[A-Za-z0-9._-]{1,128}$")
    sha256: Sha256
    size_bytes: int | None = Field(default=None, ge=1)
    url: str | None = Field(default=None, pattern=r"^https?://", max_length=2048)
    tags: list[Tag] = Field(default_factory=list)


class ModelPin(Wire):
    """The GGUF models the swarm's nodes should serve; travels signed on ``model``.

    A node follows every entry (this one, and each of ``more``) whose ``tags`` are empty or share
    one with its own. One entry: the node switches to that model. Several: it serves them all,
    loading each when a request needs it within its RAM budget."""

    kind: Literal["model"] = "model"
    swarm: str
    name: str = Field(pattern=r"^[A-Za-z0-9._-]{1,128}$")
    sha256: Sha256
    size_bytes: int | None = Field(default=None, ge=1)
    #: where a node that lacks the file downloads it (None: nodes must have it already)
    url: str | None = Field(default=None, pattern=r"^https?://", max_length=2048)
    #: only nodes carrying at least one of these tags follow the pin (empty: every node)
    tags: list[Tag] = Field(default_factory=list)
    #: grows with every pin: a node refuses an older pin replayed at it
    serial: int = Field(ge=1)
    created: float
    #: further models the swarm serves, each on the nodes its own tags say (older nodes knew
    #: none: the hub leaves the field out when it is empty)
    more: list[PinnedModel] = Field(default_factory=list, max_length=15)

    def entries(self) -> list[PinnedModel]:
        """Every pinned model, this pin's own first."""
        own = self.model_dump(include={"name", "sha256", "size_bytes", "url", "tags"})
        return [PinnedModel.model_validate(own), *self.more]

    def for_node(self, tags: Sequence[str]) -> list[PinnedModel]:
        """The entries a node carrying ``tags`` follows."""
        mine = set(tags)
        return [e for e in self.entries() if not e.tags or mine & set(e.tags)]

    def only(self, entry: PinnedModel) -> ModelPin:
        """This pin narrowed to one of its entries (what a node that follows just that one does)."""
        return self.model_copy(update={**entry.model_dump(), "more": []})

    def signed_body(self) -> dict[str, Any]:
        """What the hub signs: ``more`` left out when empty, so older nodes still read the pin."""
        body = self.model_dump(mode="json")
        if not body["more"]:
            del body["more"]
        return body


class RouteTable(Wire):
    """Experts by tag: which model answers a request carrying a tag (and naming no model);
    travels signed on ``routes``, and the hub applies it."""

    kind: Literal["routes"] = "routes"
    swarm: str
    #: tag -> model name, e.g. {"code": "qwen2.5-coder-0.5b", "chat": "SmolLM2-135M-Instruct.Q4_1"}
    routes: dict[Tag, Annotated[str, Field(pattern=r"^[A-Za-z0-9._-]{1,128}$")]] = Field(max_length=256)
    #: grows with every table: the hub keeps the newest it has seen
    serial: int = Field(ge=1)
    created: float

    def model_for(self, tags: Sequence[str]) -> str | None:
        """The model the first routed tag of ``tags`` names (None: no tag is routed)."""
        return next((self.routes[t] for t in tags if t in self.routes), None)


# ---------------------------------------------------------------- metrics (for Grafana and friends)


class Metrics(BaseModel):
    """Flat JSON, numbers only, every key always present: what Grafana's MQTT data source plots
    without transformations. A reading the device cannot take is -1, never missing or null
    (Grafana drops a key whose type changes). States are 0 or 1. Never any prompt or answer text."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False, strict=True)

    def encode(self) -> bytes:
        return self.model_dump_json().encode()


#: the value of a reading the device cannot take
UNKNOWN = -1


class NodeMetrics(Metrics):
    """``swarm/{sid}/metrics/node/{node_id}``; each key is also a fan-in topic of all nodes."""

    online: int
    paused: int
    battery_pct: float
    charging: int
    temp_c: float
    tokens_per_s: float
    busy: int
    queue_depth: int
    tasks_done: int
    tasks_failed: int
    pauses: int
    #: over the node's recent answers that carried energy; -1 when none did
    joules_per_token: float


class HubMetrics(Metrics):
    """``swarm/{sid}/metrics/hub``: the swarm as the hub sees it, over the last minute."""

    nodes_online: int
    nodes_paused: int
    nodes_offline: int
    inflight: int
    queue_depth: int
    requests_per_s: float
    answered_per_s: float
    errors_per_min: int
    #: over the answers of the last minute; -1 when there were none
    latency_p50_ms: float
    latency_p95_ms: float
    answered_total: int
    failed_total: int
