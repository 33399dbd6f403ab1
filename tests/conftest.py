"""Shared fixtures. Tests drive the real thing: the `filterd` command, the pipeline, real
servers on loopback. Helpers here only start and stop things."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"
SHARED = Path(os.environ.get("FILTERD_SHARED", ROOT.parent / "shared"))
CORPUS = SHARED / "testdata" / "corpus" / "spamassassin"

GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"

# The suite never reads the machine's /etc/filterd/filterd.toml (the Debian package test
# installs one): every filterd process started by a test inherits this.
os.environ["FILTERD_NO_DEFAULT_CONFIG"] = "1"
# ... and never writes the machine's /var/lib/filterd: commands run without --config or
# --set server.state_dir keep their state in a private directory for this test session.
_SESSION_STATE = Path(tempfile.mkdtemp(prefix="filterd-test-state-"))
_SESSION_CONFIG = _SESSION_STATE / "filterd.toml"
_SESSION_CONFIG.write_text(f'[server]\nstate_dir = "{_SESSION_STATE}"\n')
os.environ["FILTERD_CONFIG"] = str(_SESSION_CONFIG)


def make_message(body: str = "Hello,\r\n\r\nA plain message.\r\n", subject: str = "Hello",
                 sender: str = "alice@example.com", to: str = "bob@example.org",
                 extra_headers: str = "") -> bytes:
    head = (f"From: Alice <{sender}>\r\nTo: {to}\r\nSubject: {subject}\r\n"
            "Date: Fri, 27 Nov 2026 08:00:00 +0000\r\n"
            f"Message-ID: <t{abs(hash(body))}@example.com>\r\n"
            f"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n{extra_headers}")
    return (head + "\r\n" + body).encode()


def run_filterd(*args: str, input: bytes | None = None, env: dict | None = None,
                timeout: float = 120, check: bool = False) -> subprocess.CompletedProcess:
    """Run the real `filterd` command (the installed console script's module)."""
    e = dict(os.environ)
    e.update(env or {})
    proc = subprocess.run([sys.executable, "-m", "filterd", *args], input=input,
                          capture_output=True, timeout=timeout, env=e)
    if check and proc.returncode not in (0,):
        raise AssertionError(f"filterd {' '.join(args)} exited {proc.returncode}:\n"
                             f"{proc.stderr.decode(errors='replace')}")
    return proc


def check_json(path_or_bytes, *args: str, env=None) -> tuple[int, dict]:
    """`filterd check --json` on a file path or message bytes; returns (exit code, JSON)."""
    if isinstance(path_or_bytes, (bytes, bytearray)):
        proc = run_filterd("check", "--json", *args, "-", input=bytes(path_or_bytes), env=env)
    else:
        proc = run_filterd("check", "--json", *args, str(path_or_bytes), env=env)
    out = proc.stdout.decode()
    assert out.strip(), f"no output; stderr:\n{proc.stderr.decode(errors='replace')}"
    return proc.returncode, json.loads(out)


@pytest.fixture
def state_dir(tmp_path) -> Path:
    d = tmp_path / "state"
    d.mkdir()
    return d


@pytest.fixture
async def pipeline_factory(tmp_path):
    """Build real pipelines from --set style overrides (no config file needed)."""
    from filterd.pipeline import Pipeline

    made = []

    async def make(*overrides: str, config: str | None = None, **kw):
        ov = [f"server.state_dir={tmp_path / 'state'}", *overrides]
        pipe = await Pipeline.create(config, ov, use_default_path=False, **kw)
        made.append(pipe)
        return pipe

    yield make
    for p in made:
        await p.close()


@pytest.fixture(scope="module", params=["native", "pymilter"])
def milter_engine(request):
    """Run a milter test module once per milter engine: filterd's own protocol code and
    libmilter through pymilter (tests/milter_support.py's FilterdMilterProc starts it)."""
    import milter_support

    old, milter_support.ENGINE = milter_support.ENGINE, request.param
    yield request.param
    milter_support.ENGINE = old
