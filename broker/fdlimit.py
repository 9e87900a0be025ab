"""Raise this process's open-file limit, so a burst of connections cannot lock the swarm out.

Every TCP connection is a file descriptor. At the usual soft limit of 1,024, 1,100 connections that
never log in were enough to make the hub's own login fail. Linux lets any process raise its soft
limit up to the hard one; the systemd units raise the hard one (``LimitNOFILE=65536``).
"""

from __future__ import annotations

import structlog

log = structlog.get_logger("nova_swarm.broker")

#: below this, a LAN broker can be starved of sockets: say so
LOW = 4096


def raise_open_file_limit(*, low: int = LOW) -> int | None:
    """Lift the soft RLIMIT_NOFILE to the hard limit; return the new soft limit (None where
    the platform has no such limit). A limit still under ``low`` gets a warning with the fix."""
    try:
        import resource
    except ImportError:  # not on this platform (Windows)
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:  # some sandboxes (Android) refuse even this
            log.warning("cannot raise the open-file limit", soft=soft, hard=hard, error=str(exc))
    if soft != resource.RLIM_INFINITY and soft < low:
        log.warning(
            "open-file limit is low: a burst of connections can lock out the hub and nodes",
            limit=soft,
            fix="raise the hard limit (ulimit -Hn, or LimitNOFILE= in the systemd unit)",
        )
    return None if soft == resource.RLIM_INFINITY else int(soft)
