"""Every topic the swarm uses, built and checked in one place.

``topics.md`` documents the same set; ``tests/test_topics.py`` keeps the two in step through
:data:`CATALOGUE`. Nothing else in the code base writes a topic string by hand.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from nova_swarm.broker.contract.errors import ConfigError

ROOT = "swarm"
_ID = re.compile(r"^[a-z0-9_-]{1,64}$")
#: a routing tag as a topic level (the wire allows these characters in tags too)
_TAG = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
#: a request id (``messages.RequestId``) as a topic level
_REQUEST_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
DEFAULT_SWARM = "main"
DEFAULT_REPLY = "default"
#: The scope of the bare ``prompt`` and ``cancel`` topics, which any client login may write: its
#: replies go to ``reply/default`` (and below), which every client may read.
SHARED_SCOPE = DEFAULT_REPLY
#: The hub's own login: it may read and write every reply topic anyway, so its requests may name any.
HUB_SCOPE = "hub"


def check_id(value: str, *, what: str) -> str:
    """Ids become topic levels and ACL patterns: keep them to ``[a-z0-9_-]``."""
    if not _ID.match(value):
        raise ConfigError(f"{what} {value!r} must be 1-64 characters of a-z, 0-9, '_' or '-'")
    return value


#: Names no node or client login may take: the hub's and the shared client's logins, the shared
#: reply scope, the old shared node login, and the gateway's own client login. Node ids and
#: client login names share one namespace (a login's name is its topic level, and Mosquitto's
#: ``%u`` patterns reach every login), so no name is ever both.
RESERVED_NODE_IDS = frozenset({"hub", "client", "node", DEFAULT_REPLY, "gateway"})
RESERVED_LOGINS = RESERVED_NODE_IDS


def check_node_id(value: str) -> str:
    check_id(value, what="node id")
    if value in RESERVED_NODE_IDS:
        raise ConfigError(f"node id {value!r} is reserved; pick another")
    return value


def check_login_name(value: str) -> str:
    """A client login's name (``swarm-hub enroll --client NAME``)."""
    check_id(value, what="client login name")
    if value in RESERVED_LOGINS:
        raise ConfigError(f"login name {value!r} is reserved; pick another")
    return value


#: MQTT's topic length limit, in UTF-8 bytes (3.1.1 section 1.5.3)
MAX_TOPIC_BYTES = 65_535
#: C0 and C1 controls and Unicode non-characters: MQTT says a topic should not hold them, and
#: Mosquitto drops a client that publishes to one; lone surrogates cannot be encoded at all.
_NONCHARACTERS = "\ufdd0-\ufdef" + "".join(chr(plane << 16 | 0xFFFE) + chr(plane << 16 | 0xFFFF) for plane in range(17))
_UNSENDABLE = re.compile(f"[\x00-\x1f\x7f-\x9f\ud800-\udfff{_NONCHARACTERS}]")


def is_concrete(topic: str) -> bool:
    """A topic a client may publish to on any broker: no wildcards, no ``$``, no control
    characters or unencodable text, and within MQTT's length limit.

    amqtt stops serving a connection that publishes to a wildcard or ``$`` topic without closing
    it, and Mosquitto drops one that publishes to a topic with control characters (BROKERS.md,
    defect 4), so we refuse such publishes before they reach the socket.
    """
    return (
        bool(topic)
        and not topic.startswith("$")
        and "+" not in topic
        and "#" not in topic
        and _UNSENDABLE.search(topic) is None
        and len(topic.encode("utf-8")) <= MAX_TOPIC_BYTES
    )


def matches(topic_filter: str, topic: str) -> bool:
    """MQTT 3.1.1 topic-filter matching (section 4.7)."""
    if topic.startswith("$") and not topic_filter.startswith("$"):
        return False
    f_levels = topic_filter.split("/")
    t_levels = topic.split("/")
    for i, f in enumerate(f_levels):
        if f == "#":
            return True
        if i >= len(t_levels):
            return False
        if f != "+" and f != t_levels[i]:
            return False
    return len(f_levels) == len(t_levels)


class NodeTopic(StrEnum):
    """The last level of a per-node topic."""

    ANNOUNCE = "announce"
    STATUS = "status"
    HEARTBEAT = "heartbeat"
    TASK = "task"
    CANCEL = "cancel"
    RESULT = "result"
    STREAM = "stream"
    PROGRESS = "progress"


@dataclass(frozen=True, slots=True)
class TopicSpec:
    """One row of the topic contract; ``pattern`` uses ``{sid}``, ``{node_id}`` and ``{name}``."""

    pattern: str
    publisher: str
    subscriber: str
    qos: int
    retained: bool


#: The whole contract. topics.md has one table row per entry, in this order.
CATALOGUE: tuple[TopicSpec, ...] = (
    TopicSpec("swarm/{sid}/prompt", "client", "hub", 1, False),
    TopicSpec("swarm/{sid}/prompt/{login}", "client", "hub", 1, False),
    TopicSpec("swarm/{sid}/reply/{login}", "hub", "client", 1, False),
    TopicSpec("swarm/{sid}/reply/{login}/{name}", "hub", "client", 1, False),
    TopicSpec("swarm/{sid}/reply/{login}/stream/{request_id}", "hub", "client", 1, False),
    TopicSpec("swarm/{sid}/cancel", "client", "hub", 1, False),
    TopicSpec("swarm/{sid}/cancel/{login}", "client", "hub", 1, False),
    TopicSpec("swarm/{sid}/node/{node_id}/announce", "node", "hub, client", 1, True),
    TopicSpec("swarm/{sid}/node/{node_id}/status", "node", "hub, client", 1, True),
    TopicSpec("swarm/{sid}/node/{node_id}/heartbeat", "node", "hub, client", 0, False),
    TopicSpec("swarm/{sid}/node/{node_id}/task", "hub", "node", 1, False),
    TopicSpec("swarm/{sid}/node/{node_id}/cancel", "hub", "node", 1, False),
    TopicSpec("swarm/{sid}/node/{node_id}/result", "node", "hub", 1, False),
    TopicSpec("swarm/{sid}/node/{node_id}/stream", "node", "hub", 1, False),
    TopicSpec("swarm/{sid}/node/{node_id}/progress", "node", "hub", 0, False),
    TopicSpec("swarm/{sid}/hub/status", "hub", "client, node", 1, True),
    TopicSpec("swarm/{sid}/hub/nodes", "hub", "client", 1, True),
    TopicSpec("swarm/{sid}/model", "hub", "node, client", 1, True),
    TopicSpec("swarm/{sid}/bundle", "hub", "node, client", 1, True),
    TopicSpec("swarm/{sid}/bundle/chunk/{index}", "hub", "node", 1, True),
    TopicSpec("swarm/{sid}/routes", "hub", "hub, client", 1, True),
    TopicSpec("swarm/{sid}/metrics/hub", "hub", "client", 0, False),
    TopicSpec("swarm/{sid}/metrics/node/{node_id}", "hub", "client", 0, False),
    TopicSpec("swarm/{sid}/metrics/{metric}", "hub", "client", 0, False),
    TopicSpec("swarm/{sid}/metrics/win_rate/{tag}", "hub", "client", 0, False),
)


@dataclass(frozen=True, slots=True)
class Topics:
    """Topic builders for one swarm. ``Topics("main").node_task("pixel7")``."""

    swarm: str = DEFAULT_SWARM

    def __post_init__(self) -> None:
        check_id(self.swarm, what="swarm id")

    @property
    def base(self) -> str:
        return f"{ROOT}/{self.swarm}"

    # client <-> hub. A request's scope is the login that sent it: the hub learns it from the
    # topic, which only that login may write (acl.py). The bare topics are the shared scope.
    def prompt(self, login: str | None = None) -> str:
        """``prompt`` (the shared scope), or ``prompt/{login}``, which only ``login`` may write."""
        return self._scoped("prompt", login)

    def cancel(self, login: str | None = None) -> str:
        """Clients ask the hub to drop a request here (by its id, within the same scope)."""
        return self._scoped("cancel", login)

    def prompt_filter(self) -> str:
        return f"{self.base}/prompt/+"

    def cancel_filter(self) -> str:
        return f"{self.base}/cancel/+"

    def _scoped(self, kind: str, login: str | None) -> str:
        if login is None:
            return f"{self.base}/{kind}"
        return f"{self.base}/{kind}/{check_id(login, what='login')}"

    def prompt_scope(self, topic: str) -> str | None:
        """Whose prompt: ``swarm/main/prompt/alice`` -> ``"alice"``, ``swarm/main/prompt`` -> the
        shared scope; None for anything else."""
        return self._scope_of("prompt", topic)

    def cancel_scope(self, topic: str) -> str | None:
        return self._scope_of("cancel", topic)

    def _scope_of(self, kind: str, topic: str) -> str | None:
        bare = f"{self.base}/{kind}"
        if topic == bare:
            return SHARED_SCOPE
        login = topic.removeprefix(bare + "/")
        if login == topic or not _ID.match(login) or login == SHARED_SCOPE:
            return None  # "prompt/default" would let one login pose as the shared scope's owner
        return login

    def reply(self, login: str = DEFAULT_REPLY, name: str | None = None) -> str:
        """``reply/{login}``, a login's private reply topic (``reply/default``: the shared one), or
        ``reply/{login}/{name}``, one of several under it (a ``SwarmClient`` takes its own)."""
        topic = f"{self.base}/reply/{check_id(login, what='login')}"
        return topic if name is None else f"{topic}/{check_id(name, what='reply name')}"

    def reply_filter(self) -> str:
        return f"{self.base}/reply/#"

    def stream(self, reply_topic: str, request_id: str) -> str:
        """A streamed request's tokens: beside its reply topic, so whoever may read the reply
        may read the stream (``reply/{login}/stream/{request_id}``)."""
        if not self.is_reply_topic(reply_topic):
            raise ConfigError(f"{reply_topic!r} is not a reply topic")
        if not _REQUEST_ID.match(request_id):
            raise ConfigError(f"request id {request_id!r} cannot be a topic level")
        return f"{reply_topic}/stream/{request_id}"

    def is_reply_topic(self, topic: str) -> bool:
        """Replies may only go under ``reply/``: the hub must never be tricked into publishing a
        client-chosen payload onto a task or status topic."""
        prefix = f"{self.base}/reply/"
        return topic.startswith(prefix) and len(topic) > len(prefix) and is_concrete(topic)

    def in_scope(self, reply_topic: str, scope: str) -> bool:
        """May a request of ``scope`` have its reply sent to ``reply_topic``? Only to the scope's
        own ``reply/{scope}`` and below, so nobody can push answers into another login's topic.
        The hub's own login may name any reply topic (it may publish there anyway)."""
        if not self.is_reply_topic(reply_topic):
            return False
        if scope == HUB_SCOPE:
            return True
        own = f"{self.base}/reply/{scope}"
        return reply_topic == own or reply_topic.startswith(own + "/")

    # per node
    def node(self, node_id: str, kind: NodeTopic) -> str:
        return f"{self.base}/node/{check_id(node_id, what='node id')}/{kind}"

    def node_announce(self, node_id: str) -> str:
        return self.node(node_id, NodeTopic.ANNOUNCE)

    def node_status(self, node_id: str) -> str:
        return self.node(node_id, NodeTopic.STATUS)

    def node_heartbeat(self, node_id: str) -> str:
        return self.node(node_id, NodeTopic.HEARTBEAT)

    def node_task(self, node_id: str) -> str:
        return self.node(node_id, NodeTopic.TASK)

    def node_cancel(self, node_id: str) -> str:
        return self.node(node_id, NodeTopic.CANCEL)

    def node_result(self, node_id: str) -> str:
        return self.node(node_id, NodeTopic.RESULT)

    def node_stream(self, node_id: str) -> str:
        return self.node(node_id, NodeTopic.STREAM)

    def node_progress(self, node_id: str) -> str:
        return self.node(node_id, NodeTopic.PROGRESS)

    def all_nodes(self, kind: NodeTopic) -> str:
        return f"{self.base}/node/+/{kind}"

    def parse_node_topic(self, topic: str) -> tuple[str, NodeTopic] | None:
        """``swarm/main/node/pixel7/status`` -> ``("pixel7", NodeTopic.STATUS)``; else None."""
        parts = topic.split("/")
        if len(parts) != 5 or parts[0] != ROOT or parts[1] != self.swarm or parts[2] != "node":
            return None
        if not _ID.match(parts[3]) or parts[3] in RESERVED_NODE_IDS:
            return None  # not a node: a reserved id is some other login writing under node/
        try:
            return parts[3], NodeTopic(parts[4])
        except ValueError:
            return None

    # hub
    def hub_status(self) -> str:
        return f"{self.base}/hub/status"

    def hub_nodes(self) -> str:
        return f"{self.base}/hub/nodes"

    # retained, signed pins: the model and the node bundle every node should run
    def model(self) -> str:
        return f"{self.base}/model"

    def bundle(self) -> str:
        return f"{self.base}/bundle"

    def routes(self) -> str:
        """Retained, signed: which model answers which tag (``RouteTable``)."""
        return f"{self.base}/routes"

    def bundle_chunk(self, index: int) -> str:
        if index < 0:
            raise ConfigError(f"chunk index must be 0 or more, not {index}")
        return f"{self.base}/bundle/chunk/{index}"

    def bundle_chunks(self) -> str:
        return f"{self.base}/bundle/chunk/+"

    def parse_bundle_chunk(self, topic: str) -> int | None:
        prefix = f"{self.base}/bundle/chunk/"
        index = topic.removeprefix(prefix)
        if index == topic or not index.isdigit() or len(index) > 6:
            return None
        return int(index)

    # metrics: flat JSON for dashboards (messages.NodeMetrics, HubMetrics)
    def metrics_hub(self) -> str:
        return f"{self.base}/metrics/hub"

    def metrics_node(self, node_id: str) -> str:
        return f"{self.base}/metrics/node/{check_id(node_id, what='node id')}"

    def metrics_fan_in(self, metric: str) -> str:
        """One key per node: ``{"pixel7": 4.2, "s20": 3.1}``; ``errors`` has one key per error code."""
        if metric in ("hub", "node", "win_rate") or not _ID.match(metric):
            raise ConfigError(f"{metric!r} is not a fan-in metric name")
        return f"{self.base}/metrics/{metric}"

    def metrics_win_rate(self, tag: str) -> str:
        """Decayed win rate per node for one routing tag (``all``: over every request)."""
        if not _TAG.match(tag):
            raise ConfigError(f"tag {tag!r} cannot be a topic level")
        return f"{self.base}/metrics/win_rate/{tag}"

    def metrics_all(self) -> str:
        return f"{self.base}/metrics/#"

    def parse_metrics(self, topic: str) -> tuple[str, str] | None:
        """What a metrics topic carries: ``("hub", "")``, ``("node", node_id)``, ``("win_rate", tag)``
        or ``("fan_in", metric)``; None for any other topic (or a level that cannot be one)."""
        rest = topic.removeprefix(f"{self.base}/metrics/")
        if rest == topic:
            return None
        kind, _, name = rest.partition("/")
        if rest == "hub":
            return ("hub", "")
        if kind == "node" and _ID.match(name):
            return ("node", name)
        if kind == "win_rate" and _TAG.match(name):
            return ("win_rate", name)
        if "/" not in rest and kind not in ("hub", "node", "win_rate") and _ID.match(rest):
            return ("fan_in", rest)
        return None

    def everything(self) -> str:
        return f"{self.base}/#"
