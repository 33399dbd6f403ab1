"""The mailstore end to end: mail delivered through the real gateway into Maildir++ mailboxes,
fetched with Python's poplib and Debian's fetchmail over filterd's POP3 server, read and moved
with imaplib through a real Dovecot using the shipped configuration snippet."""
from __future__ import annotations

import imaplib
import json
import os
import poplib
import shutil
import smtplib
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from delivery_peers import make_cert
from gateway_fixtures import Gateway, free_port, wait_for, wait_port

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "correct horse battery"


def add_user(tmp: Path, user: str, password: str = PASSWORD, *extra: str) -> Path:
    users = tmp / "users"
    subprocess.run([sys.executable, "-m", "filterd", "user", "add", user, "--file", str(users),
                    "--password-stdin", *extra], input=(password + "\n").encode(), check=True,
                   capture_output=True)
    return users


def send(port: int, rcpt: str, subject: str, body: str = "Hello.\r\n", sender="bob@remote.test"):
    msg = (f"From: {sender}\r\nTo: {rcpt}\r\nSubject: {subject}\r\n"
           "Date: Fri, 27 Nov 2026 09:00:00 +0000\r\n"
           f"Message-ID: <{time.time_ns()}@remote.test>\r\n"
           f"\r\n{body}")
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.sendmail(sender, [rcpt], msg.encode())


def inbox_files(state: Path, user: str, folder: str = "") -> list[Path]:
    local, domain = user.split("@")
    md = state / "mail" / domain / local / "Maildir"
    if folder:
        md = md / f".{folder}"
    return [p for sub in ("new", "cur") if (md / sub).is_dir() for p in (md / sub).iterdir()]


@pytest.fixture
def mailgw(tmp_path):
    users = add_user(tmp_path, "ann@example.test")
    cert, key = make_cert(tmp_path)
    gw = Gateway(tmp_path, "--set", 'delivery.local_domains=["example.test"]',
                 "--set", f"smtp.users_file={users}", "--set", 'pop3.listen=["127.0.0.1:0"]',
                 "--set", f"pop3.tls_cert={cert}", "--set", f"pop3.tls_key={key}",
                 "--set", "mailstore.junk_scan_interval=1h")
    gw.users = users
    yield gw
    gw.stop()


def pop(gw) -> poplib.POP3:
    return poplib.POP3("127.0.0.1", gw.ports["pop3"], timeout=30)


def test_pop3_fetches_gateway_mail_and_deletes_only_at_quit(mailgw):
    for i in range(3):
        send(mailgw.port, "ann@example.test", f"message {i}")
    wait_for(lambda: len(inbox_files(mailgw.state, "ann@example.test")) == 3, 30, "3 deliveries")
    p = pop(mailgw)
    caps = p.capa()
    assert {"UIDL", "TOP", "USER", "STLS"} <= set(caps)
    p.user("ann@example.test")
    p.pass_(PASSWORD)
    assert p.stat()[0] == 3
    uids = [line.split()[1] for line in p.uidl()[1]]
    # the delivery core may deliver the three in any order: find each by its subject
    texts = [b"\r\n".join(p.retr(n)[1]) for n in (1, 2, 3)]
    assert sorted(t.split(b"Subject: ")[1].split(b"\r\n")[0] for t in texts) == [
        b"message 0", b"message 1", b"message 2"]
    assert all(b"X-Filterd-ID:" in t and b"Hello." in t for t in texts)
    _, top, _ = p.top(1, 0)
    head = b"\r\n".join(top)
    assert b"Subject: message " in head and b"Hello." not in head
    p.dele(1)
    p.sock.close()  # dropped without QUIT: nothing may be deleted
    p = pop(mailgw)
    p.user("ann@example.test")
    p.pass_(PASSWORD)
    assert [line.split()[1] for line in p.uidl()[1]] == uids  # stable across sessions
    p.dele(1)
    p.quit()
    p = pop(mailgw)
    p.user("ann@example.test")
    p.pass_(PASSWORD)
    assert [line.split()[1] for line in p.uidl()[1]] == uids[1:]
    p.quit()


def test_pop3_refuses_guessing_garbage_and_second_sessions(mailgw):
    p = pop(mailgw)
    with pytest.raises(poplib.error_proto, match="log in first"):
        p.stat()
    with pytest.raises(poplib.error_proto, match="line too long"):
        p._shortcmd("NOOP " + "x" * 5000)
    p = pop(mailgw)
    for _ in range(5):
        p.user("ann@example.test")
        with pytest.raises(poplib.error_proto, match="invalid user name or password"):
            p.pass_("wrong")
    p.user("ann@example.test")
    with pytest.raises(poplib.error_proto, match="too many failed logins"):
        p.pass_(PASSWORD)  # locked out now, even with the right password
    assert "locked out" in mailgw.log()


def test_pop3_stls_and_maildrop_lock(mailgw):
    send(mailgw.port, "ann@example.test", "tls")
    wait_for(lambda: inbox_files(mailgw.state, "ann@example.test"), 30, "delivery")
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    p = pop(mailgw)
    p.stls(ctx)
    assert "STLS" not in p.capa()
    p.user("ann@example.test")
    p.pass_(PASSWORD)
    assert p.stat()[0] == 1
    q = pop(mailgw)
    q.user("ann@example.test")
    with pytest.raises(poplib.error_proto, match="IN-USE"):
        q.pass_(PASSWORD)
    p.quit()


def test_plaintext_passwords_are_refused_off_loopback_policy(tmp_path):
    users = add_user(tmp_path, "ann@example.test")
    gw = Gateway(tmp_path, "--set", 'delivery.local_domains=["example.test"]',
                 "--set", f"smtp.users_file={users}", "--set", 'pop3.listen=["127.0.0.1:0"]',
                 "--set", "pop3.allow_plaintext_loopback=false")
    try:
        p = pop(gw)
        with pytest.raises(poplib.error_proto, match="use STLS first"):
            p.user("ann@example.test")
    finally:
        gw.stop()


@pytest.mark.skipif(not shutil.which("fetchmail"), reason="fetchmail not installed")
def test_fetchmail_fetches_over_pop3(mailgw, tmp_path):
    for i in range(2):
        send(mailgw.port, "ann@example.test", f"fetch {i}")
    wait_for(lambda: len(inbox_files(mailgw.state, "ann@example.test")) == 2, 30, "deliveries")
    out = tmp_path / "fetched"
    out.mkdir()
    rc = tmp_path / "fetchmailrc"
    rc.write_text(f'poll 127.0.0.1 service {mailgw.ports["pop3"]} protocol pop3 auth password\n'
                  f'  user "ann@example.test" password "{PASSWORD}" sslproto "" '
                  f'mda "/bin/sh -c \'cat > {out}/$$.$(date +%s%N)\'"\n')
    rc.chmod(0o600)
    proc = subprocess.run(["fetchmail", "-f", str(rc), "--nodetach", "-v", "--nosyslog",
                           "-i", str(tmp_path / "fetchids")],
                          capture_output=True, timeout=60,
                          env={**os.environ, "HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr.decode() + proc.stdout.decode()
    got = sorted(f.read_bytes() for f in out.iterdir())
    assert len(got) == 2 and all(b"Subject: fetch" in g for g in got)
    assert inbox_files(mailgw.state, "ann@example.test") == []  # fetched and deleted at QUIT


def test_tagged_spam_lands_in_junk_and_quotas_defer_or_bounce(tmp_path):
    users = add_user(tmp_path, "ann@example.test")
    gw = Gateway(tmp_path, "--set", 'delivery.local_domains=["example.test"]',
                 "--set", f"smtp.users_file={users}", "--set", "actions.add_header=0.5",
                 "--set", 'mailstore.users."ann@example.test".quota="3K"')
    try:
        send(gw.port, "ann@example.test", "FREE MONEY NOW!!!!", "act now, limited time offer")
        wait_for(lambda: inbox_files(gw.state, "ann@example.test", "Junk"), 30, "junk delivery")
        assert inbox_files(gw.state, "ann@example.test") == []
        # a message bigger than the whole quota bounces at DATA with 552 5.2.2
        with pytest.raises(smtplib.SMTPDataError) as err:
            send(gw.port, "ann@example.test", "big", ("x" * 70 + "\r\n") * 80)
        assert err.value.smtp_code == 552 and err.value.smtp_error.startswith(b"5.2.2")
        # fill the mailbox: the next RCPT is deferred with 452 4.2.2
        from filterd.delivery.local import deliver_maildir

        deliver_maildir(gw.state / "mail" / "example.test" / "ann" / "Maildir", b"y" * 3000)
        with smtplib.SMTP("127.0.0.1", gw.port, timeout=30) as s:
            s.ehlo("client.test")
            s.mail("bob@remote.test")
            code, text = s.rcpt("ann@example.test")
        assert (code, text.split()[0]) == (452, b"4.2.2")
    finally:
        gw.stop()


# -- Dovecot --------------------------------------------------------------------------------------
DOVECOT_CONF = """
base_dir = {tmp}/dovecot-run
state_dir = {tmp}/dovecot-state
log_path = {tmp}/dovecot.log
protocols = imap
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
default_internal_user = dovecot
default_login_user = dovenull
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
service anvil {{
  chroot =
}}
service imap-login {{
  chroot =
}}
!include {snippet}
"""


@pytest.fixture
def open_dir():
    """Dovecot's processes run as other users: they need a path they can traverse."""
    d = Path(tempfile.mkdtemp(prefix="filterd-dovecot-"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def imapgw(open_dir):
    users = add_user(open_dir, "ann@example.test")
    gw = Gateway(open_dir, "--set", 'delivery.local_domains=["example.test"]',
                 "--set", f"smtp.users_file={users}", "--set", "mailstore.junk_scan_interval=1h")
    os.chmod(gw.state, 0o755)
    gw.users = users
    gw.dovecot_passwd = open_dir / "dovecot-passwd"
    yield gw
    gw.stop()


@pytest.fixture
def dovecot(imapgw, open_dir):
    if not shutil.which("dovecot") or os.geteuid() != 0:
        pytest.fail("Dovecot tests need Debian's dovecot-imapd and root (as in CI)")
    tmp_path = open_dir
    snippet = (ROOT / "packaging" / "dovecot" / "99-filterd.conf").read_text()
    snippet = snippet.replace("/var/lib/filterd", str(imapgw.state)) \
        .replace("/etc/filterd/dovecot-passwd", str(imapgw.dovecot_passwd)) \
        .replace("uid=filterd", "uid=mail").replace("gid=filterd", "gid=mail") \
        .replace("first_valid_uid = 100", "first_valid_uid = 8")
    (tmp_path / "99-filterd.conf").write_text(snippet)
    port = free_port()
    conf = tmp_path / "dovecot.conf"
    conf.write_text(DOVECOT_CONF.format(tmp=tmp_path, port=port,
                                        snippet=tmp_path / "99-filterd.conf"))
    proc = subprocess.Popen(["dovecot", "-F", "-c", str(conf)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        wait_port(port, 20)
    except AssertionError:
        proc.kill()
        raise AssertionError(proc.stdout.read().decode() +
                             (tmp_path / "dovecot.log").read_text(errors="replace"))
    yield port
    proc.terminate()
    proc.wait(10)


def test_imap_through_dovecot_reads_inbox_and_junk_and_a_move_to_junk_is_learned(
        imapgw, dovecot):
    mailgw = imapgw
    # `filterd user passwd` keeps Dovecot's passwd-file in step
    dpw = mailgw.dovecot_passwd
    subprocess.run([sys.executable, "-m", "filterd", "user", "passwd", "ann@example.test",
                    "--file", str(mailgw.users), "--password-stdin",
                    "--set", f"mailstore.dovecot_passwd={dpw}"],
                   input=(PASSWORD + "\n").encode(), check=True, capture_output=True)
    assert dpw.read_text().startswith("ann@example.test:{SHA512-CRYPT}$6$")
    send(mailgw.port, "ann@example.test", "keep me")
    send(mailgw.port, "ann@example.test", "cheap watches")
    wait_for(lambda: len(inbox_files(mailgw.state, "ann@example.test")) == 2, 30, "deliveries")
    subprocess.run(["chown", "-R", "mail:mail", str(mailgw.state / "mail")], check=True)
    # first scan records what is there
    subprocess.run([sys.executable, "-m", "filterd", "mailstore", "learn-junk",
                    "--set", f"server.state_dir={mailgw.state}"], check=True, capture_output=True)
    imap = imaplib.IMAP4("127.0.0.1", dovecot)
    imap.login("ann@example.test", PASSWORD)
    _, boxes = imap.list()
    names = b" ".join(boxes)
    assert b"Junk" in names and b"\\Junk" in names
    typ, data = imap.select("INBOX")
    assert typ == "OK" and int(data[0]) == 2
    _, found = imap.search(None, "SUBJECT", '"cheap watches"')
    uid = found[0].split()[0]
    typ, _ = imap.copy(uid, "Junk")
    assert typ == "OK"
    imap.store(uid, "+FLAGS", "\\Deleted")
    imap.expunge()
    typ, data = imap.select("Junk")
    assert int(data[0]) == 1
    imap.logout()
    proc = subprocess.run([sys.executable, "-m", "filterd", "mailstore", "learn-junk",
                           "--set", f"server.state_dir={mailgw.state}"], capture_output=True)
    out = proc.stdout.decode()
    assert "learned spam" in out and "1 message(s) learned" in out, out
    # ... into the Bayes store the gateway uses
    stats = subprocess.run([sys.executable, "-m", "filterd", "bayes", "stats", "--json",
                            "--set", f"server.state_dir={mailgw.state}"], capture_output=True)
    assert json.loads(stats.stdout)["spam_messages"] == 1, stats.stdout
