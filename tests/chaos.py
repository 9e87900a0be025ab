"""The chaos run: many prompts while nodes, the hub and the broker are killed under them.

    python -m tests.chaos --prompts 500 --duration 150     # `make chaos`, the full run
    (tests/test_chaos.py runs a shorter one in CI)

Everything is real and in its own process: the embedded broker, ``swarm-hub serve``, four
``swarm-node`` processes on the fake engine (they answer after a short delay, so kills land
mid-task) and one on llama-cpp with the bundled model. The clients behave as a careful client
should: each prompt has its own id, and a prompt with no reply after a while is sent again with
the *same* id, so the hub's journal and idempotent replies are what keep the count exact.

At the end every prompt must have exactly one reply, an answer or an explicit error:
``lost`` (no reply) and ``conflicting`` (two different replies for one id) must both be 0.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from nova_swarm.broker.contract.errors import ErrorCode, ProtocolError
from nova_swarm.broker.contract.messages import Answer, ErrorReply, GenParams, PromptRequest, decode_reply
from nova_swarm.broker.contract.topics import Topics
from nova_swarm.broker.home import Role, SwarmHome
from nova_swarm.broker.link.connection import Connection, ConnectionLost, wait_for_broker
from nova_swarm.broker.link.net import free_port
from nova_swarm.broker.link.reconnect import Backoff, reconnecting

BIN = Path(sys.executable).parent
#: replies that say "not now": the client sends the same id again after the hinted delay
NOT_FINAL = {ErrorCode.HUB_BUSY, ErrorCode.RATE_LIMITED}


@dataclass
class Tally:
    sent: int = 0
    answered: int = 0
    errored: int = 0
    lost: int = 0
    conflicting: int = 0
    #: the same reply received again (a retried id whose stored reply was re-sent)
    repeated: int = 0
    resends: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    events: list[str] = field(default_factory=list)

    def report(self) -> str:
        lines = [
            f"chaos tally: sent={self.sent} answered={self.answered} errored={self.errored} "
            f"lost={self.lost} duplicates={self.conflicting} (repeats of the same reply={self.repeated}, "
            f"resends={self.resends})",
        ]
        if self.errors:
            lines.append("  errors: " + ", ".join(f"{code}={n}" for code, n in self.errors.most_common()))
        lines += [f"  {event}" for event in self.events]
        return "\n".join(lines)


class Client:
    """Sends its prompts (at most ``window`` outstanding), re-sends unanswered ones by id."""

    def __init__(
        self,
        url_of: Callable[[], object],
        name: str,
        prompts: dict[str, PromptRequest],
        *,
        window: int,
        resend_after: float,
        interval: float,
    ) -> None:
        self.url_of = url_of
        self.name = name
        self.topics = Topics()
        self.reply_topic = self.topics.reply("default", name)  # the bare prompt's scope
        self.prompts = {rid: p.model_copy(update={"reply_to": self.reply_topic}) for rid, p in prompts.items()}
        self.window = window
        self.resend_after = resend_after
        #: new prompts go out at most one per ``interval`` s, so the load spans the faults
        self.interval = interval
        self._next_new = 0.0
        #: ids never sent yet, in order; kept across reconnects
        self.unsent = list(self.prompts)
        self.replies: dict[str, list[bytes]] = defaultdict(list)
        self.final: dict[str, Answer | ErrorReply] = {}
        self.next_send: dict[str, float] = {}
        self.resends = 0
        self.done = asyncio.Event()

    def _connect(self) -> Connection:
        return Connection(self.url_of(), client_id=self.name)  # type: ignore[arg-type]

    async def run(self) -> None:
        await reconnecting(self._connect, self._session, name=self.name, backoff=Backoff(first=0.2, cap=2.0))

    async def _session(self, conn: Connection) -> None:
        await conn.subscribe(self.reply_topic, qos=1)
        async with asyncio.TaskGroup() as tg:
            sender = tg.create_task(self._send_loop(conn))
            reader = tg.create_task(self._read(conn))
            await self.done.wait()
            sender.cancel()
            reader.cancel()

    async def _read(self, conn: Connection) -> None:
        async for message in conn.messages():
            try:
                reply = decode_reply(message.payload)
            except ProtocolError:
                continue
            rid = reply.id or ""
            if rid not in self.prompts:
                continue
            if isinstance(reply, ErrorReply) and reply.error.code in NOT_FINAL:
                self.next_send[rid] = time.monotonic() + (reply.error.retry_after_s or 1.0)
                continue
            self.replies[rid].append(message.payload)
            self.final.setdefault(rid, reply)
            if len(self.final) == len(self.prompts):
                self.done.set()

    async def _send_loop(self, conn: Connection) -> None:
        order = self.unsent
        while True:
            now = time.monotonic()
            outstanding = [rid for rid in self.next_send if rid not in self.final]
            for rid in outstanding:
                if self.next_send[rid] <= now:
                    await self._publish(conn, rid)
                    self.resends += 1
            room = self.window - len([r for r in self.next_send if r not in self.final])
            while room > 0 and order and now >= self._next_new:
                await self._publish(conn, order.pop(0))
                self._next_new = max(self._next_new, now - 1.0) + self.interval
                room -= 1
            await asyncio.sleep(0.05)

    async def _publish(self, conn: Connection, rid: str) -> None:
        self.next_send[rid] = time.monotonic() + self.resend_after
        await conn.publish(self.topics.prompt(), self.prompts[rid].encode(), qos=1)


class Swarm:
    """The processes under test, each restartable, each logging to its own file."""

    def __init__(self, workdir: Path, *, fake_delay: float) -> None:
        self.workdir = workdir
        self.home = SwarmHome(workdir / "config")
        self.home.ensure()
        self.port = free_port()
        self.fake_delay = fake_delay
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.env = {
            **os.environ,
            "NOVA_SWARM_HOME": str(self.home.path),
            "XDG_STATE_HOME": str(workdir / "state"),
            "PYTHONUNBUFFERED": "1",
        }

    def url(self, role: Role) -> object:
        return self.home.url(role, port=self.port)

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = (self.workdir / f"{name}.log").open("ab")
        # Each in its own process group: a node is a supervisor and its child, and a signal here
        # stands for the whole device freezing or dying.
        self.procs[name] = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
        )

    def _common(self) -> list[str]:
        return ["--config-dir", str(self.home.path), "--port", str(self.port)]

    async def start_broker(self) -> None:
        self._spawn(
            "broker",
            [sys.executable, "-m", "nova_swarm.broker", "--port", str(self.port), "--config-dir", str(self.home.path)],
        )
        await wait_for_broker(self.home.url(Role.HUB, port=self.port), exited=self.procs["broker"].poll)

    def start_hub(self) -> None:
        self._spawn(
            "hub",
            [
                str(BIN / "swarm-hub"),
                "serve",
                *self._common(),
                "--heartbeat-timeout",
                "3",
                "--request-timeout",
                "90",
                "--rate-limit",
                "100000",
                "--max-queued",
                "64",
            ],
        )

    def start_node(self, name: str) -> None:
        argv = [
            str(BIN / "swarm-node"),
            "run",
            *self._common(),
            "--node-id",
            name,
            "--heartbeat",
            "1",
            "--slots",
            "2",
            "--queue-max",
            "2",
            "--drain",
            "2",
        ]
        if name.startswith("llama"):
            from nova_swarm.node.models import bundled_model

            argv += ["--model", str(bundled_model()), "--threads", "1", "--max-tokens", "12", "--slots", "1"]
        else:
            argv += ["--engine", "fake", "--engine-option", f"delay_s={self.fake_delay}"]
        self._spawn(name, argv)

    def signal(self, name: str, sig: int) -> None:
        proc = self.procs[name]
        if proc.poll() is None:
            os.killpg(proc.pid, sig)
            if sig == signal.SIGKILL:
                proc.wait()

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGCONT)
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


async def run_chaos(
    workdir: Path,
    *,
    prompts: int,
    clients: int,
    duration: float,
    fake_delay: float = 0.08,
    out: Callable[[str], None] = print,
) -> Tally:
    """Run the scenario; ``duration`` spreads the faults (the whole run takes a bit longer)."""
    swarm = Swarm(workdir, fake_delay=fake_delay)
    tally = Tally()
    started = time.monotonic()

    def event(text: str) -> None:
        line = f"t={time.monotonic() - started:6.1f}s  {text}"
        tally.events.append(line)
        out(line)

    try:
        await swarm.start_broker()
        swarm.start_hub()
        for name in ("fake1", "fake2", "fake3", "fake4", "llama1"):
            swarm.start_node(name)
        event("broker, hub, 4 fake nodes and 1 llama-cpp node started")

        per_client: list[dict[str, PromptRequest]] = [{} for _ in range(clients)]
        for i in range(prompts):
            rid = f"chaos-{i:04d}"
            per_client[i % clients][rid] = PromptRequest(
                id=rid, prompt=f"Say one word about the number {i}.", params=GenParams(max_tokens=12, temperature=0.0)
            )
        window = 16
        swarm_clients = [
            Client(
                lambda: swarm.url(Role.CLIENT),
                f"chaos-client-{c}",
                per_client[c],
                window=window,
                resend_after=max(8.0, duration / 10),
                interval=0.85 * duration / len(per_client[c]),
            )
            for c in range(clients)
        ]
        tally.sent = prompts

        def at(fraction: float) -> float:
            return started + fraction * duration

        script: list[tuple[float, str, Callable[[], object]]] = [
            (0.10, "SIGKILL fake1 (mid-task)", lambda: swarm.signal("fake1", signal.SIGKILL)),
            (0.16, "fake1 restarted", lambda: swarm.start_node("fake1")),
            (0.20, "SIGSTOP fake2", lambda: swarm.signal("fake2", signal.SIGSTOP)),
            (0.32, "SIGCONT fake2 (its late answers must be ignored)", lambda: swarm.signal("fake2", signal.SIGCONT)),
            (0.35, "SIGKILL the hub", lambda: swarm.signal("hub", signal.SIGKILL)),
            (0.38, "hub restarted", swarm.start_hub),
            (0.50, "SIGKILL the broker", lambda: swarm.signal("broker", signal.SIGKILL)),
            (0.53, "broker restarted", None),  # async: handled below
            (0.62, "SIGKILL llama1", lambda: swarm.signal("llama1", signal.SIGKILL)),
            (0.66, "llama1 restarted", lambda: swarm.start_node("llama1")),
            (0.72, "SIGKILL fake3", lambda: swarm.signal("fake3", signal.SIGKILL)),
            (0.78, "fake3 restarted", lambda: swarm.start_node("fake3")),
        ]

        async def faults() -> None:
            for fraction, text, action in script:
                await asyncio.sleep(max(0.0, at(fraction) - time.monotonic()))
                if action is None:
                    await swarm.start_broker()
                else:
                    action()
                event(text)

        async with asyncio.TaskGroup() as tg:
            runners = [tg.create_task(c.run()) for c in swarm_clients]
            chaos = tg.create_task(faults())
            give_up = started + duration + 90.0
            while time.monotonic() < give_up and not all(c.done.is_set() for c in swarm_clients):
                await asyncio.sleep(0.5)
            chaos.cancel()
            for c in swarm_clients:
                c.done.set()
            await asyncio.sleep(0.5)
            for r in runners:
                r.cancel()
        event("run over")

        for c in swarm_clients:
            tally.resends += c.resends
            for rid in c.prompts:
                got = c.replies.get(rid, [])
                if not got:
                    tally.lost += 1
                    continue
                distinct = set(got)
                tally.conflicting += len(distinct) > 1
                tally.repeated += len(got) - len(distinct)
                reply = c.final[rid]
                if isinstance(reply, Answer):
                    tally.answered += 1
                else:
                    tally.errored += 1
                    tally.errors[reply.error.code.value] += 1
        return tally
    except ConnectionLost as exc:
        raise RuntimeError(f"chaos run could not start: {exc}") from exc
    finally:
        swarm.stop_all()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=500)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--duration", type=float, default=150.0, help="seconds over which faults are spread")
    parser.add_argument("--workdir", type=Path, default=None, help="logs and config (default: a temp dir)")
    args = parser.parse_args(argv)
    import tempfile

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="nova-chaos-"))
    workdir.mkdir(parents=True, exist_ok=True)
    tally = asyncio.run(run_chaos(workdir, prompts=args.prompts, clients=args.clients, duration=args.duration))
    print(tally.report())
    print(f"logs: {workdir}")
    return 0 if tally.lost == 0 and tally.conflicting == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
