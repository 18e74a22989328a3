"""The agent as started by the fan-out launcher: ``python -m launcher.remote``.

Reads one JSON line from stdin (the worker spec, this node's place, the job secret, the
environment to forward), runs a :class:`~launcher.agent.LocalAgent`, and exits with its
code. It then keeps reading stdin: EOF means the launcher stopped the job or its ssh
connection dropped, so the agent stops its workers and exits; nothing is left behind.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import threading

from .agent import LocalAgent
from .node import NodeSpec
from .worker import WorkerSpec


def encode(
    spec: WorkerSpec,
    node: NodeSpec,
    *,
    max_restarts: int,
    secret: str,
    env: dict[str, str],
    stop_grace: float = 5.0,
    hang_timeout: float = 0.0,
    hang_stop: bool = True,
) -> bytes:
    """The launcher side: the line written to the agent's stdin."""
    s = dataclasses.asdict(spec)
    s["only_ranks"] = sorted(spec.only_ranks) if spec.only_ranks is not None else None
    n = dataclasses.asdict(node)
    n["secret"] = None
    msg = {"spec": s, "node": n, "max_restarts": max_restarts, "secret": secret, "env": env, "stop_grace": stop_grace}
    msg["hang"] = {"hang_timeout": hang_timeout, "hang_stop": hang_stop}
    return (json.dumps(msg) + "\n").encode()


def decode(line: bytes) -> tuple[WorkerSpec, NodeSpec, dict]:
    msg = json.loads(line)
    s = msg["spec"]
    s["entrypoint"] = list(s["entrypoint"])
    s["only_ranks"] = frozenset(s["only_ranks"]) if s["only_ranks"] is not None else None
    s["python"] = s.get("python") or sys.executable
    node = NodeSpec(**msg["node"])
    node.secret = msg["secret"]
    return WorkerSpec(**s), node, msg


def _watch_stdin(agent: LocalAgent) -> None:
    try:  # the raw fd, not sys.stdin: a daemon thread must not hold the buffer's lock at exit
        while os.read(0, 4096):
            pass
    except (OSError, ValueError):
        pass
    agent.interrupt(signal.SIGHUP)


def main() -> int:
    line = b""
    while not line.endswith(b"\n"):  # byte by byte from the raw fd: nothing after the line gets buffered
        ch = os.read(0, 1)
        if not ch:
            break
        line += ch
    if not line.strip():
        print(
            "launcher.remote: no configuration on stdin (this module is started by `disttrain launch`)", file=sys.stderr
        )
        return 2
    spec, node, msg = decode(line)
    os.environ.update(msg.get("env") or {})
    hang = msg.get("hang") or {}  # the hang watch: this node's ranks, one report through the store
    agent = LocalAgent(
        spec,
        node,
        max_restarts=msg["max_restarts"],
        stop_grace=msg.get("stop_grace", 5.0),
        report=False,
        hang_timeout=float(hang.get("hang_timeout", 0.0)),
        hang_stop=bool(hang.get("hang_stop", True)),
    )
    threading.Thread(target=_watch_stdin, args=(agent,), name="stdin-watch", daemon=True).start()
    return agent.run().exit_code


if __name__ == "__main__":
    sys.exit(main())
