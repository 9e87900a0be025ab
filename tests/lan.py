"""The virtual LAN harness (network namespaces on a bridge); it lives in ``nova_swarm.bench.lan``
so that `swarm-bench` can use it too."""

from nova_swarm.bench.lan import HUB_ADDRESS, PREFIX, SUBNET, Host, Lan, LanUnavailable, check_available, sweep

__all__ = ["HUB_ADDRESS", "PREFIX", "SUBNET", "Host", "Lan", "LanUnavailable", "check_available", "sweep"]
