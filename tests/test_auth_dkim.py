"""DKIM: RFC 6376 / RFC 8463 examples verify and tampered copies fail; our signatures verify
with our verifier and with a real opendkim; opendkim-signed mail verifies with ours; broken tags,
bad and huge keys, DNS failures end in RFC results."""
from __future__ import annotations

import base64
import os
import shutil
import subprocess

import pytest

from filterd.dns import FixtureResolver
from filterd.model import Session
from filterd_plugins.dkim import sign_message, verify_message

from auth_fixtures import DATA, dkim_zones, ed25519_public

from conftest import make_message, run_filterd

KEYS = DATA / "dkim"
OPENDKIM = shutil.which("opendkim") or "/usr/sbin/opendkim"
needs_opendkim = pytest.mark.skipif(not os.path.exists(OPENDKIM),
                                    reason="opendkim not installed (Debian package opendkim)")


def resolver() -> FixtureResolver:
    return FixtureResolver(dkim_zones())


@pytest.mark.parametrize("name", ["rfc6376.signed.msg", "rfc6376.signed.rsa.msg"])
async def test_rfc8463_examples_verify(name):
    raw = (KEYS / name).read_bytes()
    results = await verify_message(resolver(), raw)
    assert results and all(r.result == "pass" for r in results), results
    algs = {r.algorithm for r in results}
    assert "rsa-sha256" in algs
    if name == "rfc6376.signed.msg":
        assert "ed25519-sha256" in algs


@pytest.mark.parametrize("name", ["rfc6376.signed.msg", "rfc6376.signed.rsa.msg"])
@pytest.mark.parametrize("tamper", [(b"Is dinner ready?", b"Is lunch ready?"),
                                    (b"Joe.", b"Jim.")])
async def test_tampered_examples_fail(name, tamper):
    raw = (KEYS / name).read_bytes()
    assert tamper[0] in raw
    results = await verify_message(resolver(), raw.replace(tamper[0], tamper[1]))
    assert results and all(r.result == "fail" for r in results), results


async def test_sign_then_verify_rsa_and_ed25519():
    raw = (KEYS / "test.message").read_bytes()
    for sel, key, alg in (("test", (KEYS / "test.private").read_bytes(), "rsa-sha256"),
                          ("ed", (KEYS / "ed25519test.key").read_bytes().strip(),
                           "ed25519-sha256")):
        value = sign_message(raw, "example.com", sel, key, alg, "relaxed/relaxed",
                             ["from", "to", "subject", "date", "message-id"], ["from"])
        signed = b"DKIM-Signature: " + value.encode() + b"\r\n" + raw
        [r] = await verify_message(resolver(), signed)
        assert (r.result, r.algorithm, r.selector) == ("pass", alg, sel), r.reason
        [bad] = await verify_message(resolver(), signed.replace(b"test message", b"best message"))
        assert bad.result == "fail"


# -- the plugin in a pipeline: signs authenticated mail, verifies everything ------------------
def signing_config(tmp_path, extra: str = "") -> str:
    cfg = tmp_path / "filterd.toml"
    cfg.write_text(f"""
[server]
state_dir = "{tmp_path / 'state'}"
hostname = "mx.example.net"
[dkim.domains."example.com"]
selector = "test"
key = "{KEYS / 'test.private'}"
[dkim.domains."ed.example.org"]
selector = "ed"
key = "{KEYS / 'ed25519test.key'}"
algorithm = "ed25519-sha256"
{extra}
""")
    return str(cfg)


async def test_plugin_signs_authenticated_mail_per_domain(pipeline_factory, tmp_path):
    zones = dkim_zones()
    zones["ed._domainkey.ed.example.org"] = {
        "TXT": [f"v=DKIM1; k=ed25519; p={ed25519_public('ed25519test.key')}"]}
    res = FixtureResolver(zones)
    pipe = await pipeline_factory(config=signing_config(tmp_path), resolver=res)
    for sender, domain, sel in (("alice@example.com", "example.com", "test"),
                                ("bob@ed.example.org", "ed.example.org", "ed"),
                                ("carol@sub.example.com", "example.com", "test")):
        msg = make_message(sender=sender, subject="Quarterly numbers")
        result = await pipe.scan(msg, sender, ["x@example.net"],
                                 Session(peer_ip="192.0.2.10", auth_user="alice"))
        out = result.message_bytes()
        assert out.startswith(b"DKIM-Signature:") or b"\nDKIM-Signature:" in out
        assert result.ctx.data["dkim.signed"] == {"domain": domain, "selector": sel}
        [r] = await verify_message(res, out)
        assert (r.result, r.domain, r.selector) == ("pass", domain, sel), r.reason


async def test_plugin_does_not_sign_unauthenticated_or_unknown_domains(pipeline_factory,
                                                                        tmp_path):
    pipe = await pipeline_factory(config=signing_config(tmp_path), resolver=resolver())
    r1 = await pipe.scan(make_message(sender="alice@example.com"), "alice@example.com",
                         ["x@example.net"], Session(peer_ip="198.51.100.7"))
    assert "dkim.signed" not in r1.ctx.data
    r2 = await pipe.scan(make_message(sender="eve@other.example"), "eve@other.example",
                         ["x@example.net"], Session(peer_ip="198.51.100.7", auth_user="eve"))
    assert "dkim.signed" not in r2.ctx.data


async def test_internal_networks_count_as_ours(pipeline_factory, tmp_path):
    cfg = signing_config(tmp_path, '[auth]\ninternal_networks = ["192.0.2.0/24"]\n')
    pipe = await pipeline_factory(config=cfg, resolver=resolver())
    r = await pipe.scan(make_message(sender="alice@example.com"), "alice@example.com",
                        ["x@example.net"], Session(peer_ip="192.0.2.55"))
    assert r.ctx.data["dkim.signed"]["domain"] == "example.com"


async def test_signature_covers_other_plugins_changes(pipeline_factory, tmp_path):
    """Signing runs last: a subject rewrite by spam_headers before it is signed as rewritten."""
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "50-test.toml").write_text("[actions]\nrewrite_subject = -100.0\n")
    cfg = signing_config(tmp_path, f'[rules]\nsite_dir = "{rules}"\n')
    res = resolver()
    pipe = await pipeline_factory(config=cfg, resolver=res)
    r = await pipe.scan(make_message(sender="alice@example.com", subject="Hi"),
                        "alice@example.com", ["x@example.net"],
                        Session(peer_ip="192.0.2.10", auth_user="alice"))
    out = r.message_bytes()
    assert b"Subject: [SPAM] Hi" in out
    [v] = await verify_message(res, out)
    assert v.result == "pass", v.reason


def test_missing_signing_key_fails_at_start_naming_it(tmp_path):
    cfg = tmp_path / "f.toml"
    cfg.write_text('[dkim.domains."example.com"]\nselector = "s1"\n'
                   f'key = "{tmp_path / "nope.key"}"\n')
    proc = run_filterd("check", "--config", str(cfg), "-", input=make_message())
    err = proc.stderr.decode()
    assert proc.returncode != 0
    assert "nope.key" in err and "example.com" in err and "keygen" in err


# -- interoperability with a real opendkim -----------------------------------------------------
def _opendkim(tmp_path, conf: str, msg: bytes) -> str:
    d = tmp_path / "odk"
    d.mkdir(exist_ok=True)
    (d / "msg.eml").write_bytes(msg)
    (d / "opendkim.conf").write_text(conf + "\nSyslog no\n")
    proc = subprocess.run([OPENDKIM, "-x", str(d / "opendkim.conf"), "-t", str(d / "msg.eml"),
                           "-vvv"], capture_output=True, timeout=60)
    return proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace")


def _public_keys_file(tmp_path, entries: dict) -> str:
    p = tmp_path / "keys.txt"
    p.write_text("".join(f"{name} {value}\n" for name, value in entries.items()))
    return str(p)


@needs_opendkim
@pytest.mark.parametrize("alg", ["rsa-sha256", "ed25519-sha256"])
async def test_our_signature_verifies_with_opendkim(pipeline_factory, tmp_path, alg):
    res = resolver()
    pipe = await pipeline_factory(config=signing_config(tmp_path), resolver=res)
    domain = "example.com" if alg == "rsa-sha256" else "ed.example.org"
    sender = f"alice@{domain}"
    r = await pipe.scan(make_message(sender=sender, subject="Interop"), sender, ["x@example.net"],
                        Session(peer_ip="192.0.2.10", auth_user="alice"))
    signed = r.message_bytes()
    sel = r.ctx.data["dkim.signed"]["selector"]
    pub = (KEYS / "test.txt").read_text().strip() if alg == "rsa-sha256" else \
        f"v=DKIM1; k=ed25519; p={ed25519_public('ed25519test.key')}"
    keys = _public_keys_file(tmp_path, {f"{sel}._domainkey.{domain}": pub})
    out = _opendkim(tmp_path, f"Mode v\nTestPublicKeys {keys}\n", signed)
    assert f"d={domain}" in out and "verification" in out
    assert "succeeded" in out and "dkim=pass" in out, out
    # and opendkim notices tampering (the check above can fail)
    out = _opendkim(tmp_path, f"Mode v\nTestPublicKeys {keys}\n",
                    signed.replace(b"A plain message.", b"A plain massage."))
    assert "dkim=fail" in out, out


@needs_opendkim
async def test_opendkim_signed_mail_verifies_with_ours(tmp_path):
    msg = make_message(sender="alice@example.com", subject="Signed by opendkim")
    conf = (f"Mode s\nDomain example.com\nSelector test\nKeyFile {KEYS / 'test.private'}\n"
            "SignatureAlgorithm rsa-sha256\nCanonicalization relaxed/relaxed\n"
            "RequireSafeKeys no\n")
    out = _opendkim(tmp_path, conf, msg)
    start = out.index("hname='DKIM-Signature' hvalue='") + len("hname='DKIM-Signature' hvalue='")
    value = out[start:out.index("'", start)]
    signed = b"DKIM-Signature: " + value.replace("\n", "\r\n").encode() + b"\r\n" + msg
    [r] = await verify_message(resolver(), signed)
    assert (r.result, r.domain, r.algorithm) == ("pass", "example.com", "rsa-sha256"), r.reason
    [bad] = await verify_message(resolver(), signed.replace(b"A plain message.", b"A plain m."))
    assert bad.result == "fail"


# -- bad input ends in RFC results, never an exception ----------------------------------------
def _sig(tags: str) -> bytes:
    return (f"DKIM-Signature: {tags}\r\n").encode() + (KEYS / "test.message").read_bytes()


GOOD_B = base64.b64encode(b"x" * 128).decode()
BH = "bh=2jUSOH9NhtVGCQWNr9BrIAPreKQjO6Sn7XIkfJVOzv8="


@pytest.mark.parametrize("tags,expected", [
    ("v=1; a=rsa-sha256; d=example.com; s=test; h=from", "permerror"),  # no b=, bh=
    ("v=1; a=rsa-sha256; d=example.com; s=test; h=from; b=!!!; " + BH, "permerror"),
    ("v=1; a=rsa-md5; d=example.com; s=test; h=from; b=" + GOOD_B + "; " + BH, "permerror"),
    ("v=2; a=rsa-sha256; d=example.com; s=test; h=from; b=" + GOOD_B + "; " + BH, "permerror"),
    ("v=1; a=rsa-sha256; d=example.com; s=test; h=from; i=@evil.example; b=" + GOOD_B + "; "
     + BH, "permerror"),
    ("v=1; a=rsa-sha256; d=example.com; s=test; h=from; x=12; t=100; b=" + GOOD_B + "; " + BH,
     "permerror"),
    ("this is not a tag list at all", "permerror"),
    ("v=1; a=rsa-sha256; d=example.com; s=test; h=from; b=" + GOOD_B + "; " + BH, "fail"),
    ("v=1; a=rsa-sha256; d=example.com; s=nokey; h=from; b=" + GOOD_B + "; " + BH,
     "permerror"),
    ("v=1; a=rsa-sha256; d=example.com; s=badk; h=from; b=" + GOOD_B + "; " + BH, "permerror"),
    ("v=1; a=rsa-sha256; d=example.com; s=badversion; h=from; b=" + GOOD_B + "; " + BH,
     "permerror"),
    ("v=1; a=rsa-sha256; d=example.com; s=slow; h=from; b=" + GOOD_B + "; " + BH, "temperror"),
    ("v=1; a=rsa-sha1; d=example.com; s=test; h=from; b=" + GOOD_B + "; " + BH, "permerror"),
], ids=["missing-tags", "bad-base64", "unknown-alg", "bad-version", "i-not-in-d", "expired",
        "garbage", "bad-signature", "no-key", "bad-k-tag", "bad-key-record", "dns-timeout",
        "rsa-sha1"])
async def test_broken_signatures_give_rfc_results(tags, expected):
    results = await verify_message(resolver(), _sig(tags))
    assert [r.result for r in results] == [expected], results[0].reason


async def test_huge_key_is_refused_cheaply():
    zones = dkim_zones()
    huge = base64.b64encode(b"\x30\x82" + os.urandom(8200)).decode()  # ~65000-bit "key"
    zones["huge._domainkey.example.com"] = {"TXT": [f"v=DKIM1; k=rsa; p={huge}"]}
    [r] = await verify_message(FixtureResolver(zones), _sig(
        "v=1; a=rsa-sha256; d=example.com; s=huge; h=from; b=" + GOOD_B + "; " + BH))
    assert r.result == "permerror" and "too large" in r.reason


async def test_many_signatures_are_capped():
    sigs = b"".join(f"DKIM-Signature: v=1; a=rsa-sha256; d=example.com; s=s{i}; h=from; "
                    f"b={GOOD_B}; {BH}\r\n".encode() for i in range(15))
    results = await verify_message(resolver(), sigs + (KEYS / "test.message").read_bytes(),
                                   max_signatures=10)
    assert len(results) == 15
    assert [r.result for r in results[10:]] == ["neutral"] * 5


async def test_message_without_signature_is_scored_dkim_none(pipeline_factory):
    pipe = await pipeline_factory(resolver=resolver())
    r = await pipe.scan(make_message(), "a@example.com", ["b@example.net"])
    assert r.ctx.data["dkim"] == []
    assert "DKIM_NONE" in r.ctx.symbols


# -- filterd dkim keygen: the operator's path from key to verified signature ------------------
def _record_from_output(out: str) -> tuple[str, str]:
    """(owner name, TXT value) from keygen's zone-file record ( "chunk" "chunk" )."""
    import re

    start = out.index("._domainkey.")
    start = out.rindex("\n", 0, start) + 1
    record = out[start:out.index(")", start)]
    name = record.split(" ", 1)[0].rstrip(".")
    return name, "".join(re.findall(r'"([^"]*)"', record))


@pytest.mark.parametrize("alg", ["rsa", "ed25519"])
async def test_keygen_key_signs_via_filterd_check_and_verifies(tmp_path, alg):
    keydir = tmp_path / "keys"
    proc = run_filterd("dkim", "keygen", "--domain", "example.com", "--selector", "k1",
                       "--algorithm", alg, "--dir", str(keydir))
    assert proc.returncode == 0, proc.stderr.decode()
    out = proc.stdout.decode()
    keyfile = keydir / "example.com.k1.key"
    assert keyfile.stat().st_mode & 0o777 == 0o600
    name, record = _record_from_output(out)
    assert name == "k1._domainkey.example.com" and record.startswith(f"v=DKIM1; k={alg}; p=")
    again = run_filterd("dkim", "keygen", "--domain", "example.com", "--selector", "k1",
                        "--dir", str(keydir))
    assert again.returncode == 1 and b"exists" in again.stderr  # never overwrites silently
    cfg = tmp_path / "f.toml"
    cfg.write_text(f'[server]\nstate_dir = "{tmp_path}"\n[dkim.domains."example.com"]\n'
                   f'selector = "k1"\nkey = "{keyfile}"\n'
                   f'algorithm = "{"rsa-sha256" if alg == "rsa" else "ed25519-sha256"}"\n')
    dns = tmp_path / "dns.toml"
    dns.write_text(f'["{name}"]\nTXT = ["{record}"]\n')
    signed = tmp_path / "signed.eml"
    proc = run_filterd("check", "--config", str(cfg), "--set", f"dns.fixtures={dns}",
                       "--auth-user", "alice", "--from", "alice@example.com",
                       "--output", str(signed), "-",
                       input=make_message(sender="alice@example.com"))
    assert proc.returncode in (0, 3), proc.stderr.decode()
    [r] = await verify_message(FixtureResolver({name: {"TXT": [record]}}), signed.read_bytes())
    assert (r.result, r.selector) == ("pass", "k1"), r.reason
    if os.path.exists(OPENDKIM):
        keys = _public_keys_file(tmp_path, {name: record})
        out = _opendkim(tmp_path, f"Mode v\nTestPublicKeys {keys}\n", signed.read_bytes())
        assert "dkim=pass" in out, out


async def test_unparseable_headers_without_signature_are_none_with_signature_permerror():
    bad_head = b"From: a@example.com\r\nThis line is no header\r\nSubject: x\r\n\r\nbody\r\n"
    assert await verify_message(resolver(), bad_head) == []
    signed = b"DKIM-Signature: v=1; a=rsa-sha256; d=example.com; s=test; h=from; b=" + \
        GOOD_B.encode() + b"; " + BH.encode() + b"\r\n" + bad_head
    [r] = await verify_message(resolver(), signed)
    assert r.result == "permerror" and "not parseable" in r.reason


def test_keygen_defaults_to_state_dir_with_a_full_config(tmp_path):
    cfg = tmp_path / "f.toml"
    cfg.write_text(f'[server]\nstate_dir = "{tmp_path / "st"}"\n[dkim.domains."example.com"]\n'
                   f'selector = "old"\nkey = "{tmp_path / "old.key"}"\n')
    proc = run_filterd("dkim", "keygen", "--config", str(cfg), "--domain", "Example.COM",
                       "--selector", "new")
    assert proc.returncode == 0, proc.stderr.decode()
    assert (tmp_path / "st" / "dkim" / "example.com.new.key").is_file()
