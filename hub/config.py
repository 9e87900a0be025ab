"""The hub's settings: one frozen object built by the CLI and passed down."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from nova_swarm.broker.contract.errors import ConfigError
from nova_swarm.broker.contract.topics import DEFAULT_SWARM, check_id
from nova_swarm.broker.link.base import MqttVersion
from nova_swarm.broker.link.connection import HEARTBEAT_S, written_off_after

from .credits import CreditRates
from .intake import Limits
from .retrieval import RetrievalConfig


@dataclass(frozen=True, slots=True)
class HubConfig:
    db_path: Path
    swarm: str = DEFAULT_SWARM
    hub_id: str = "hub"
    #: a node unheard for this long is offline: by default when the broker's keepalive would
    #: write an idle node off too (1.5 keepalives of a node on the default heartbeat, 22.5 s)
    heartbeat_timeout_s: float = written_off_after(HEARTBEAT_S)
    #: a busy node that shows no progress on an attempt for this long has lost that attempt,
    #: which goes to another node (only for nodes that announce ``progress_s``; see lifecycle.py)
    quiet_s: float = 2.0
    #: a request's deadline when it gives no ``timeout_s``
    default_timeout_s: float = 120.0
    #: re-dispatches allowed per request after failed, lost or late attempts
    retries: int = 2
    #: an attempt gets ``slack`` times its expected generation time, and at least ``attempt_min_s``
    attempt_min_s: float = 10.0
    attempt_slack: float = 3.0
    limits: Limits = field(default_factory=Limits)
    winrate_half_life_s: float = 86_400.0
    reranker: str = "rules"
    status_interval_s: float = 10.0
    #: metrics on swarm/{sid}/metrics/... for dashboards; 0 publishes none
    metrics_interval_s: float = 5.0
    #: the contribution ledger and the key that signs its receipts; no ledger unless both are set
    ledger_path: Path | None = None
    signing_key_file: Path | None = None
    #: the enrolment file, for which nodes the owner trusts with private requests (none if None)
    nodes_file: Path | None = None
    credit_rates: CreditRates = field(default_factory=CreditRates)
    flush_interval_s: float = 2.0
    #: on shutdown, how long in-flight requests may finish before they get ``hub_stopping``
    drain_s: float = 10.0
    #: after (re)connecting, how long a prompt waits for nodes to reappear before ``no_eligible_nodes``
    settle_s: float = 3.0
    #: how long a reply stays in the journal for clients that retry the same request id
    journal_keep_s: float = 600.0
    #: how many recent request ids are checked for retries without touching the disk
    journal_remember: int = 100_000
    protocol: MqttVersion = "auto"
    seed: int | None = None
    #: retrieval: add snippets from a local folder to chat prompts (off when None)
    retrieval: RetrievalConfig | None = None

    def __post_init__(self) -> None:
        check_id(self.swarm, what="swarm id")
        check_id(self.hub_id, what="hub id")
        if self.heartbeat_timeout_s <= 0 or self.default_timeout_s <= 0 or self.quiet_s <= 0:
            raise ConfigError("timeouts must be positive")
        if self.retries < 0:
            raise ConfigError("retries must be 0 or more")
