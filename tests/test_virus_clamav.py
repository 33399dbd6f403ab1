"""Virus scanning against a real clamd (started here on the custom signatures in
tests/data/clamav/db; freshclam is never run). End to end through `filterd check`."""
from __future__ import annotations

import base64
import io
import os
import shutil
import signal
import socket
import subprocess
import time
import zipfile
from email.message import EmailMessage
from pathlib import Path

import pytest

from conftest import CORPUS, DATA, check_json as _check_json

HERMETIC = DATA / "clamav" / "filterd-test.toml"


def check_json(path_or_bytes, *args: str, env=None):
    """`filterd check --json` with an empty config file: /etc/filterd cannot leak in."""
    return _check_json(path_or_bytes, "--config", str(HERMETIC), *args, env=env)

CLAM = DATA / "clamav"
TESTFILES = Path("/usr/share/clamav-testfiles")


def eicar() -> bytes:
    return base64.b64decode((CLAM / "samples" / "eicar.com.b64").read_bytes())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Clamd:
    """A private clamd on the test signatures, on a unix socket and a loopback TCP port."""

    def __init__(self, workdir: Path, stream_max: str = "25M"):
        binary = shutil.which("clamd") or shutil.which("clamd", path="/usr/sbin:/sbin")
        if binary is None:
            pytest.fail("clamd is not installed: apt-get install clamav-daemon "
                        "(listed in .ci/packages.d/virus.txt)")
        self.dir = workdir
        self.sock = workdir / "clamd.sock"
        self.port = free_port()
        self.log = workdir / "clamd.log"
        conf = workdir / "clamd.conf"
        lines = [f"DatabaseDirectory {CLAM / 'db'}", f"LocalSocket {self.sock}",
                 f"TCPSocket {self.port}", "TCPAddr 127.0.0.1", "Foreground yes",
                 f"LogFile {self.log}", f"StreamMaxLength {stream_max}",
                 f"PidFile {workdir / 'clamd.pid'}"]
        if os.getuid() == 0:
            lines.append("User root")
        conf.write_text("\n".join(lines) + "\n")
        self.errfile = workdir / "clamd.stderr"
        with open(self.errfile, "wb") as err:  # a file, not a pipe: a full pipe blocks clamd
            self.proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL,
                                         stderr=err)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"clamd exited {self.proc.returncode}: "
                                   f"{self.errfile.read_text(errors='replace')}")
            if self.sock.exists() and self.ping():
                return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"clamd did not answer PING within 120s; see {self.log}")

    def ping(self) -> bool:
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(2)
                s.connect(str(self.sock))
                s.sendall(b"zPING\0")
                return s.recv(16).startswith(b"PONG")
        except OSError:
            return False

    @property
    def unix(self) -> str:
        return f"clamav.socket={self.sock}"

    @property
    def tcp(self) -> str:
        return f"clamav.socket=127.0.0.1:{self.port}"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture(scope="session")
def clamd(tmp_path_factory):
    d = Clamd(tmp_path_factory.mktemp("clamd"))
    yield d
    d.stop()


def message(*attachments: tuple[str, bytes, str], subject: str = "documents") -> bytes:
    m = EmailMessage()
    m["From"] = "Alice <alice@example.com>"
    m["To"] = "bob@example.org"
    m["Subject"] = subject
    m["Date"] = "Fri, 27 Nov 2026 08:00:00 +0000"
    m["Message-ID"] = f"<{abs(hash(subject))}@example.com>"
    m.set_content("Hello Bob,\n\nplease find the files attached.\n\nAlice\n")
    for name, data, ctype in attachments:
        mt, st = ctype.split("/")
        m.add_attachment(data, maintype=mt, subtype=st, filename=name)
    return m.as_bytes()


def zipped(name: str, data: bytes) -> bytes:
    b = io.BytesIO()
    with zipfile.ZipFile(b, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(name, data)
    return b.getvalue()


def symbol(out: dict, name: str) -> dict | None:
    return next((s for s in out["symbols"] if s["name"] == name), None)


RCPT = ("--rcpt", "bob@example.org", "--from", "alice@example.com")
# the attachment policy would also refuse some of these files by name: switch it off where the
# test is about what clamd finds
NO_ATTACH = ("--set", "attachments.enabled=false")


# ---------------------------------------------------------------------------------------------
def test_eicar_attachment_is_rejected_with_the_virus_name(clamd):
    rc, out = check_json(message(("eicar.txt", eicar(), "application/octet-stream")),
                         *RCPT, "--set", clamd.unix)
    sym = symbol(out, "CLAMAV_VIRUS")
    assert sym and any("EICAR" in o for o in sym["options"]), out["symbols"]
    assert out["action"] == "reject" and rc == 8
    det = out["recipient_details"]["bob@example.org"]
    assert det["code"] == 554 and "virus" in det["reason"].lower()


def test_shared_eicar_sample_message_over_tcp(clamd):
    rc, out = check_json(CLAM / "samples" / "eicar-attachment.eml", *RCPT, "--set", clamd.tcp)
    assert symbol(out, "CLAMAV_VIRUS"), out["symbols"]
    assert rc == 8


def test_eicar_inside_a_zip_is_found(clamd):
    msg = message(("report.zip", zipped("report.txt", eicar()), "application/zip"))
    rc, out = check_json(msg, *RCPT, "--set", clamd.unix)
    assert symbol(out, "CLAMAV_VIRUS"), out["symbols"]
    assert out["action"] == "reject"


def test_eicar_inside_a_nested_message_is_found(clamd):
    inner = EmailMessage()
    inner["From"], inner["To"], inner["Subject"] = "x@example.net", "y@example.net", "fwd"
    inner.set_content("forwarded")
    inner.add_attachment(eicar(), maintype="application", subtype="octet-stream",
                         filename="e.bin")
    outer = EmailMessage()
    outer["From"], outer["To"], outer["Subject"] = "alice@example.com", "bob@example.org", "Fw"
    outer.set_content("see the forwarded message")
    outer.add_attachment(inner)  # message/rfc822
    assert b"message/rfc822" in outer.as_bytes()
    rc, out = check_json(outer.as_bytes(), *RCPT, "--set", clamd.unix)
    assert symbol(out, "CLAMAV_VIRUS"), out["symbols"]
    assert rc == 8


def test_all_clamav_testfiles_are_detected(clamd):
    files = sorted(p for p in TESTFILES.iterdir() if p.is_file()) if TESTFILES.exists() else []
    assert len(files) == 44, "clamav-testfiles must be installed (.ci/packages.d/virus.txt)"
    def one(f: Path):
        msg = message((f.name, f.read_bytes(), "application/octet-stream"), subject=f.name)
        rc, out = check_json(msg, *RCPT, "--set", clamd.unix, *NO_ATTACH)
        sym = symbol(out, "CLAMAV_VIRUS")
        if not sym or rc != 8 or not any("ClamAV-Test-File" in o for o in sym["options"]):
            return (f.name, rc, [s["name"] for s in out["symbols"]])
        return None

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:  # one `filterd check` per file, four at a time
        missed = [m for m in pool.map(one, files) if m]
    assert not missed, missed


def test_clean_message_of_our_own_passes(clamd):
    msg = message(("notes.txt", b"meeting at ten\n", "text/plain"),
                  ("data.zip", zipped("data.csv", b"a,b\n1,2\n"), "application/zip"))
    rc, out = check_json(msg, *RCPT, "--set", clamd.unix)
    assert not symbol(out, "CLAMAV_VIRUS") and not symbol(out, "CLAMAV_FAIL"), out["symbols"]
    assert out["action"] == "accept" and rc == 0


@pytest.mark.skipif(not CORPUS.exists(), reason="SpamAssassin corpus not present")
def test_clean_corpus_message_passes(clamd):
    ham = sorted((CORPUS / "easy_ham").iterdir())[0]
    rc, out = check_json(ham, "--rcpt", "user@example.org", "--set", clamd.unix)
    assert not symbol(out, "CLAMAV_VIRUS") and not symbol(out, "CLAMAV_FAIL"), out["symbols"]
    assert out["action"] == "accept"


def test_quarantine_action(clamd):
    msg = message(("eicar.txt", eicar(), "application/octet-stream"))
    rc, out = check_json(msg, *RCPT, "--set", clamd.unix, "--set", "clamav.action=quarantine")
    assert symbol(out, "CLAMAV_VIRUS")
    assert out["action"] == "quarantine" and rc == 5


def test_strip_action_replaces_the_infected_part_with_a_notice(clamd, tmp_path):
    msg = message(("eicar.txt", eicar(), "application/octet-stream"),
                  ("notes.txt", b"keep me\n", "text/plain"))
    outfile = tmp_path / "out.eml"
    rc, out = check_json(msg, *RCPT, "--set", clamd.unix, "--set", "clamav.action=strip",
                         "--output", str(outfile))
    assert symbol(out, "CLAMAV_VIRUS") and symbol(out, "CLAMAV_STRIPPED")
    assert out["action"] == "accept" and rc == 0
    assert any(h["name"] == "X-Virus-Stripped" for h in out["headers"])
    cleaned = outfile.read_bytes()
    assert b"was removed by the mail gateway" in cleaned
    assert b"keep me" in cleaned or base64.b64encode(b"keep me\n") in cleaned
    assert base64.b64encode(eicar())[:40] not in cleaned
    # the cleaned message really is clean: clamd finds nothing in it any more
    rc2, out2 = check_json(cleaned, *RCPT, "--set", clamd.unix)
    assert not symbol(out2, "CLAMAV_VIRUS"), out2["symbols"]


def test_tag_action_lets_the_score_decide(clamd):
    msg = message(("eicar.txt", eicar(), "application/octet-stream"))
    rc, out = check_json(msg, *RCPT, "--set", clamd.unix, "--set", "clamav.action=tag")
    assert symbol(out, "CLAMAV_VIRUS")["score"] == 20.0  # rules/50-virus-scores.toml
    assert out["action"] == "reject"
    rc, out = check_json(msg, *RCPT, "--set", clamd.unix, "--set", "clamav.action=tag",
                         "--set", "scores.CLAMAV_VIRUS=7.0")
    assert out["action"] == "add_header"


def test_message_over_the_plugin_limit_gets_oversize_symbol_and_parts_are_scanned(clamd):
    big = os.urandom(300_000)
    msg = message(("big.bin", big, "application/octet-stream"),
                  ("eicar.txt", eicar(), "application/octet-stream"))
    rc, out = check_json(msg, *RCPT, "--set", clamd.unix,
                         "--set", "clamav.stream_max_length=200K")
    assert symbol(out, "CLAMAV_OVERSIZE"), out["symbols"]
    assert symbol(out, "CLAMAV_VIRUS"), "the small infected part must still be scanned"
    assert rc == 8
    # policy accept: passes unscanned, but never silently
    rc, out = check_json(msg, *RCPT, "--set", clamd.unix, *NO_ATTACH,
                         "--set", "clamav.stream_max_length=200K",
                         "--set", "clamav.oversize=accept")
    assert symbol(out, "CLAMAV_OVERSIZE") and not symbol(out, "CLAMAV_VIRUS")
    rc, out = check_json(msg, *RCPT, "--set", clamd.unix,
                         "--set", "clamav.stream_max_length=200K",
                         "--set", "clamav.oversize=tempfail")
    assert out["action"] == "tempfail" and rc == 7


def test_clamd_stream_limit_reply_is_treated_as_oversize(tmp_path):
    small = Clamd(tmp_path, stream_max="100K")
    try:
        msg = message(("big.bin", os.urandom(400_000), "application/octet-stream"))
        # filterd believes 25M; clamd says "INSTREAM size limit exceeded"
        rc, out = check_json(msg, *RCPT, "--set", f"clamav.socket={small.sock}",
                             "--set", "clamav.oversize=reject")
        assert symbol(out, "CLAMAV_OVERSIZE"), out["symbols"]
        assert not symbol(out, "CLAMAV_FAIL")
        assert out["action"] == "reject" and rc == 8
    finally:
        small.stop()


def test_stream_limit_read_from_clamd_conf(clamd, tmp_path):
    conf = tmp_path / "clamd.conf"
    conf.write_text("# test\nStreamMaxLength 100K\n")
    msg = message(("big.bin", os.urandom(200_000), "application/octet-stream"))
    rc, out = check_json(msg, *RCPT, "--set", clamd.unix, "--set", f"clamav.clamd_conf={conf}",
                         "--set", "clamav.oversize=accept")
    assert symbol(out, "CLAMAV_OVERSIZE"), out["symbols"]


def test_killed_clamd_means_tempfail_never_a_silent_pass(tmp_path):
    d = Clamd(tmp_path)
    msg = message(("eicar.txt", eicar(), "application/octet-stream"))
    clean = message(("notes.txt", b"hello\n", "text/plain"), subject="clean")
    try:
        rc, out = check_json(msg, *RCPT, "--set", d.unix)
        assert rc == 8
        d.kill()
        for m in (msg, clean):
            for addr in (d.unix, d.tcp):
                rc, out = check_json(m, *RCPT, "--set", addr)
                assert out["action"] == "tempfail" and rc == 7, out
                fail = symbol(out, "CLAMAV_FAIL")
                assert fail and "clamd at" in fail["options"][0]
                det = out["recipient_details"]["bob@example.org"]
                assert det["code"] == 451
        # configured accept-with-symbol: the clean message passes, marked unscanned
        rc, out = check_json(clean, *RCPT, "--set", d.unix, "--set",
                             "clamav.unavailable=accept")
        assert out["action"] == "accept" and symbol(out, "CLAMAV_FAIL")
    finally:
        d.stop()


async def test_clamd_killed_between_messages_of_one_pipeline(tmp_path, pipeline_factory):
    d = Clamd(tmp_path)
    try:
        pipe = await pipeline_factory(d.unix)
        msg = message(("eicar.txt", eicar(), "application/octet-stream"))
        outcomes = []
        for i in range(6):
            if i == 3:
                d.kill()
            r = await pipe.scan(msg, "alice@example.com", ["bob@example.org"])
            outcomes.append(r.action.value)
        assert outcomes == ["reject"] * 3 + ["tempfail"] * 3
    finally:
        d.stop()


def test_no_socket_configured_means_no_scan():
    rc, out = check_json(message(("eicar.txt", eicar(), "application/octet-stream")), *RCPT)
    assert not symbol(out, "CLAMAV_VIRUS") and not symbol(out, "CLAMAV_FAIL")


def test_bad_socket_setting_gives_a_clear_error():
    from conftest import run_filterd

    proc = run_filterd("check", "--config", str(HERMETIC),
                       "--set", "clamav.socket=localhost:notaport", "-",
                       input=message())
    assert proc.returncode != 0
    assert b"clamav.socket" in proc.stderr


def _rchar(pid: int) -> int:
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    return 0


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs /proc/<pid>/io")
async def test_clamd_killed_in_the_middle_of_a_scan_tempfails(tmp_path, pipeline_factory):
    import asyncio

    d = Clamd(tmp_path, stream_max="300M")
    try:
        pipe = await pipeline_factory(d.unix, "clamav.stream_max_length=300MB",
                                      "attachments.enabled=false")
        big = message(("data.bin", os.urandom(16 * 1024 * 1024), "application/octet-stream"))
        start = _rchar(d.proc.pid)
        task = asyncio.ensure_future(pipe.scan(big, "alice@example.com", ["bob@example.org"]))
        # wait until clamd is reading our stream, then kill it mid-transfer
        while _rchar(d.proc.pid) - start < 1024 * 1024:
            assert not task.done(), "scan finished before clamd was seen reading"
            await asyncio.sleep(0.001)
        assert not task.done()
        d.kill()
        result = await task
        assert result.action.value == "tempfail"
        assert "CLAMAV_FAIL" in {s.name for s in result.symbols}
    finally:
        d.stop()
