"""STARTTLS and the submission listener: AUTH PLAIN/LOGIN only after TLS, MAIL only after AUTH,
authenticated users may relay; users come from a file made with `filterd user`."""
from __future__ import annotations

import base64
import smtplib
import ssl
import subprocess
import uuid

import pytest

from conftest import run_filterd
from gateway_fixtures import Gateway, Raw, Sink, message, wait_for


@pytest.fixture(scope="module")
def sink():
    s = Sink()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=gw.test", "-keyout", str(d / "key.pem"),
                    "-out", str(d / "cert.pem")], check=True, capture_output=True)
    return d / "cert.pem", d / "key.pem"


@pytest.fixture(scope="module")
def users_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("users") / "users"
    p = run_filterd("user", "add", "alice@example.com", "--file", str(f), "--password-stdin",
                    input=b"s3cret pass\n")
    assert p.returncode == 0, p.stderr.decode()
    p = run_filterd("user", "add", "bob@example.com", "--file", str(f), "--password-stdin",
                    input=b"other\n")
    assert p.returncode == 0
    p = run_filterd("user", "list", "--file", str(f))
    assert p.stdout.decode().split() == ["alice@example.com", "bob@example.com"]
    text = f.read_text()
    assert "s3cret" not in text and "alice@example.com:scrypt$" in text
    return f


@pytest.fixture(scope="module")
def gw(tmp_path_factory, sink, tls_files, users_file):
    cert, key = tls_files
    g = Gateway(tmp_path_factory.mktemp("sub"), "--relayhost", f"127.0.0.1:{sink.port}",
                "--submission", "127.0.0.1:0", "--mynetworks", "192.0.2.0/24",
                "--set", f"smtp.tls_cert={cert}", "--set", f"smtp.tls_key={key}",
                "--set", f"smtp.users_file={users_file}")
    yield g
    g.stop()


def _ctx():
    c = ssl.create_default_context()
    c.check_hostname = False
    c.verify_mode = ssl.CERT_NONE
    return c


def test_inbound_listener_offers_starttls_and_relays_nothing_for_strangers(gw):
    with smtplib.SMTP("127.0.0.1", gw.ports["smtp"], timeout=20) as c:
        c.ehlo("client.test")
        assert c.has_extn("starttls")
        assert not c.has_extn("auth")
        c.starttls(context=_ctx())
        c.ehlo("client.test")
        assert not c.has_extn("starttls")
        c.mail("a@example.com")
        code, text = c.rcpt("b@example.org")
        assert code == 554 and b"Relay access denied" in text


def test_submission_requires_tls_for_auth_and_auth_for_mail(gw):
    r = Raw(gw.ports["submission"])
    r.reply()
    code, text = r.cmd("EHLO client.test")
    assert "AUTH" not in text and "STARTTLS" in text
    code, text = r.cmd("AUTH PLAIN " + base64.b64encode(b"\0alice@example.com\0s3cret pass")
                       .decode())
    assert code == 538 and "5.7.11" in text
    code, text = r.cmd("MAIL FROM:<alice@example.com>")
    assert code == 530
    r.close()


def test_auth_plain_after_starttls_allows_relaying(gw, sink):
    token = uuid.uuid4().hex
    with smtplib.SMTP("127.0.0.1", gw.ports["submission"], timeout=20) as c:
        c.ehlo("client.test")
        c.starttls(context=_ctx())
        c.ehlo("client.test")
        assert "PLAIN" in c.esmtp_features["auth"] and "LOGIN" in c.esmtp_features["auth"]
        with pytest.raises(smtplib.SMTPAuthenticationError):
            c.login("alice@example.com", "wrong")
        c.login("alice@example.com", "s3cret pass")  # smtplib tries CRAM-MD5? no: PLAIN
        c.sendmail("alice@example.com", ["someone@example.org"], message(token).encode())
    (m,) = wait_for(lambda: [x for x in sink.messages() if token.encode() in x])
    assert b"with ESMTPSA" in m and b"(authenticated sender)" in m


def test_auth_login_mechanism(gw):
    with smtplib.SMTP("127.0.0.1", gw.ports["submission"], timeout=20) as c:
        c.ehlo("client.test")
        c.starttls(context=_ctx())
        c.ehlo("client.test")
        c.user, c.password = "bob@example.com", "other"
        code, text = c.auth("LOGIN", c.auth_login)
        assert code == 235


def test_starttls_command_injection_is_refused(gw):
    # CVE-2011-0411 family: plaintext commands pipelined after STARTTLS must never be executed
    # inside the TLS session. filterd refuses the pipelined STARTTLS outright.
    r = Raw(gw.ports["smtp"])
    r.reply()
    r.cmd("EHLO client.test")
    r.send("STARTTLS\r\nMAIL FROM:<injected@example.com>\r\n")
    code, text = r.reply()
    assert code == 503 and "pipelining" in text
    r.close()


def test_state_is_reset_after_starttls(gw):
    r = Raw(gw.ports["smtp"])
    r.reply()
    r.cmd("EHLO client.test")
    assert r.cmd("STARTTLS")[0] == 220
    tls = _ctx().wrap_socket(r.sock, server_hostname="gw.test")
    tls.sendall(b"MAIL FROM:<a@example.com>\r\n")
    reply = tls.recv(1000)
    assert reply.startswith(b"503"), reply  # EHLO again first (RFC 3207 4.2)
    tls.close()


def test_user_passwd_and_del(users_file, tmp_path):
    f = tmp_path / "u"
    f.write_text(users_file.read_text())
    assert run_filterd("user", "passwd", "bob@example.com", "--file", str(f),
                       "--password-stdin", input=b"new\n").returncode == 0
    from filterd.smtp.auth import UserDB
    db = UserDB(f)
    assert db.check("bob@example.com", "new") and not db.check("bob@example.com", "other")
    assert run_filterd("user", "del", "bob@example.com", "--file", str(f)).returncode == 0
    assert run_filterd("user", "list", "--file", str(f)).stdout.decode().split() == \
        ["alice@example.com"]
    p = run_filterd("user", "del", "nobody@example.com", "--file", str(f))
    assert p.returncode == 1 and b"no user" in p.stderr
