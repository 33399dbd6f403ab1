"""Helpers to run filterd nodes as separate processes in tests (tests/pipeline_driver.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


class Node:
    """One filterd process (its own state_dir, so its own embedded store)."""

    def __init__(self, name: str, state_dir: Path, overrides: list[str]):
        self.name = name
        state_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env.pop("FILTERD_CONFIG", None)
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "pipeline_driver.py"),
             f"server.state_dir={state_dir}", *overrides],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(state_dir / "node.log", "w"),  # noqa: SIM115 - the child keeps it
            text=True, env=env)
        self.log = state_dir / "node.log"
        first = self.proc.stdout.readline()
        if not first:
            raise RuntimeError(f"node {name} did not start:\n{self.log.read_text()}")

    def send(self, msg: bytes | str, ip: str = "192.0.2.10", sender: str = "",
             rcpt: list[str] | None = None, auth: str = "") -> dict:
        req = {"ip": ip, "from": sender, "rcpt": rcpt or ["user@example.org"], "auth": auth,
               "msg": msg.decode() if isinstance(msg, bytes) else msg}
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"node {self.name} died:\n{self.log.read_text()[-3000:]}")
        return json.loads(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
