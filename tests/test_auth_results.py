"""One Authentication-Results header under our authserv-id (RFC 8601), forged ones removed;
`filterd check` on the signed RFC 8463 examples; ARC sealing in the pipeline over our
Authentication-Results, validated by the ARC validator."""
from __future__ import annotations

import authres

from filterd.dns import FixtureResolver
from filterd.model import Session
from filterd.rewrite import field_name, field_value, header_fields, split_message
from filterd_plugins.arc import validate

from auth_fixtures import DATA, dkim_zones

from conftest import check_json, make_message, run_filterd

FIXTURES = DATA / "auth" / "dns.toml"
SIGNED = DATA / "dkim" / "rfc6376.signed.msg"
AID = "mx.example.net"


def ar_headers(raw: bytes) -> list[str]:
    block, _, _ = split_message(raw)
    return [field_value(f) for f in header_fields(block)
            if field_name(f) == "authentication-results"]


def parse(value: str):
    return authres.AuthenticationResultsHeader.parse("Authentication-Results: " + value)


CONFIG = DATA / "auth" / "filterd.toml"  # authserv_id = mx.example.net


def check(path_or_bytes, *extra):
    return check_json(path_or_bytes, "--config", str(CONFIG), "--set",
                      f"dns.fixtures={FIXTURES}", *extra)


def test_filterd_check_on_signed_example_shows_authentication_results(tmp_path):
    code, out = check(SIGNED, "--ip", "192.0.2.5", "--helo", "mail.football.example.com",
                      "--from", "joe@football.example.com", "--output", str(tmp_path / "o"))
    assert code == 0
    [value] = [h["value"] for h in out["headers"] if h["name"] == "Authentication-Results"]
    ar = parse(value)
    assert ar.authserv_id == AID
    got = [(r.method, r.result) for r in ar.results]
    assert got == [("spf", "pass"), ("spf", "pass"), ("dkim", "pass"), ("dkim", "pass"),
                   ("dmarc", "pass"), ("arc", "none")]
    dkim = [r for r in ar.results if r.method == "dkim"]
    assert {(r.header_d, r.header_s, r.header_a) for r in dkim} == {
        ("football.example.com", "brisbane", "ed25519-sha256"),
        ("football.example.com", "test", "rsa-sha256")}
    [dmarc] = [str(r) for r in ar.results if r.method == "dmarc"]
    assert "header.from=football.example.com" in dmarc
    assert ar_headers((tmp_path / "o").read_bytes()) == [value]


def test_filterd_check_on_tampered_example_fails_and_rejects():
    raw = SIGNED.read_bytes().replace(b"Joe.", b"Eve.")
    code, out = check(raw, "--ip", "203.0.113.9", "--from", "joe@football.example.com")
    assert code == 8  # reject: DMARC p=reject
    [value] = [h["value"] for h in out["headers"] if h["name"] == "Authentication-Results"]
    assert [(r.method, r.result) for r in parse(value).results] == [
        ("spf", "fail"), ("dkim", "fail"), ("dkim", "fail"), ("dmarc", "fail"), ("arc", "none")]


def test_forged_authentication_results_with_our_id_are_removed(tmp_path):
    forged = (f"Authentication-Results: {AID}; dkim=pass header.d=football.example.com;\r\n"
              f"  dmarc=pass header.from=football.example.com\r\n"
              f"Authentication-Results: (sneaky) MX.Example.NET; spf=pass\r\n"
              f"Authentication-Results: other.example; spf=fail\r\n").encode()
    raw = forged + SIGNED.read_bytes().replace(b"Joe.", b"Eve.")
    code, out = check(raw, "--ip", "203.0.113.9", "--from", "joe@football.example.com",
                      "--output", str(tmp_path / "o"))
    values = ar_headers((tmp_path / "o").read_bytes())
    ours = [v for v in values if parse(v).authserv_id == AID]
    assert len(ours) == 1 and "dkim=fail" in ours[0]
    assert "other.example; spf=fail" in values  # someone else's results stay
    assert len(values) == 2


def test_no_header_without_results_and_other_ids_untouched():
    raw = b"Authentication-Results: other.example; spf=pass\r\n" + make_message()
    proc = run_filterd("check", "--json", "--config", str(CONFIG), "--set",
                       "plugins.disabled=[\"spf\",\"dkim\",\"dmarc\",\"arc\"]", "-", input=raw)
    assert b"Authentication-Results" not in proc.stdout


# -- ARC sealing at the gateway ----------------------------------------------------------------
def seal_config(tmp_path) -> str:
    cfg = tmp_path / "filterd.toml"
    cfg.write_text(f"""
[server]
state_dir = "{tmp_path / 'state'}"
[auth]
authserv_id = "{AID}"
[arc]
seal = "inbound"
domain = "example.com"
selector = "test"
key = "{DATA / 'dkim' / 'test.private'}"
""")
    return str(cfg)


async def test_arc_seal_covers_our_results_and_validates(pipeline_factory, tmp_path):
    z = dkim_zones()
    res = FixtureResolver(z)
    pipe = await pipeline_factory(config=seal_config(tmp_path), resolver=res)
    raw = SIGNED.read_bytes()
    r1 = await pipe.scan(raw, "joe@football.example.com", ["x@example.com"],
                         Session(peer_ip="192.0.2.5", helo="mail.football.example.com"))
    hop1 = r1.message_bytes()
    assert r1.ctx.data["arc.sealed"] == ["ARC-Seal", "ARC-Message-Signature",
                                         "ARC-Authentication-Results"]
    v1 = await validate(res, hop1)
    assert (v1.result, v1.instances) == ("pass", 1), v1.reason
    aar = [field_value(f) for f in header_fields(split_message(hop1)[0])
           if field_name(f) == "arc-authentication-results"][0]
    assert aar.startswith(f"i=1; {AID}") and "dkim=pass" in aar
    # a second hop sees arc=pass and extends the chain
    r2 = await pipe.scan(hop1, "joe@football.example.com", ["x@example.com"],
                         Session(peer_ip="192.0.2.6"))
    assert r2.ctx.data["arc"].result == "pass"
    v2 = await validate(res, r2.message_bytes())
    assert (v2.result, v2.instances) == ("pass", 2), v2.reason
    # tampering after sealing breaks the chain
    v3 = await validate(res, r2.message_bytes().replace(b"Joe.", b"Eve."))
    assert v3.result == "fail"


async def test_long_authentication_results_is_folded_within_line_limit(pipeline_factory):
    """Ten signatures make a header far longer than 998 characters: it is folded, and unfolds
    to the very value the plugin built."""
    z = dkim_zones()
    sigs = b"".join(
        f"DKIM-Signature: v=1; a=rsa-sha256; d=sub{i}.football.example.com; s=sel{i}; "
        f"h=from; b={'A' * 40}; bh={'B' * 44}\r\n".encode() for i in range(10))
    pipe = await pipeline_factory(f"auth.authserv_id={AID}", resolver=FixtureResolver(z))
    r = await pipe.scan(sigs + SIGNED.read_bytes(), "joe@football.example.com", ["x@example.com"],
                        Session(peer_ip="192.0.2.5"))
    value = r.ctx.data["auth_results"]
    assert len(value) > 1500
    out = r.message_bytes()
    longest = max(out.replace(b"\r\n", b"\n").split(b"\n"), key=len)
    assert len(longest) <= 998, longest[:300]
    assert ar_headers(out) == [value]
    methods = [x.method for x in parse(value).results]
    assert methods == ["spf"] + ["dkim"] * 12 + ["dmarc", "arc"]


# -- our formatting is authres' formatting ------------------------------------------------------
def authres_reference(ctx) -> str:
    """The header as authres' own objects write it (what build_authres did before it wrote the
    clauses itself): the reference the fast path must equal."""
    import authres.arc
    import authres.dmarc

    from filterd.auth import _clean, authserv_id

    results = []
    spf = ctx.data.get("spf")
    if spf:
        mf, helo = spf.get("mailfrom"), spf.get("helo")
        if mf is not None:
            if mf.identity == "mailfrom":
                results.append(authres.SPFAuthenticationResult(
                    result=mf.result, smtp_mailfrom=mf.sender or None))
            else:
                results.append(authres.SPFAuthenticationResult(
                    result=mf.result, smtp_helo=ctx.session.helo or None))
        if helo is not None and helo is not mf:
            results.append(authres.SPFAuthenticationResult(
                result=helo.result, smtp_helo=ctx.session.helo or None))
    dkim = ctx.data.get("dkim")
    if dkim is not None:
        if not dkim:
            results.append(authres.DKIMAuthenticationResult(result="none"))
        for r in dkim:
            res = authres.DKIMAuthenticationResult(
                result=r.result, result_comment=f"{r.bits}-bit key" if r.bits else None,
                reason=_clean(r.reason) if r.reason and r.result != "pass" else None,
                header_d=r.domain or None, header_i=r.identity or None,
                header_s=r.selector or None, header_a=r.algorithm or None)
            if r.b_prefix:
                res.properties.append(authres.AuthenticationResultProperty("header", "b",
                                                                           r.b_prefix))
            results.append(res)
    dmarc = ctx.data.get("dmarc")
    if dmarc is not None:
        results.append(authres.dmarc.DMARCAuthenticationResult(
            result=dmarc.result, reason=_clean(dmarc.reason) if dmarc.reason else None,
            header_from=dmarc.domain or None,
            policy=dmarc.policy if dmarc.result in ("pass", "fail") else None,
            result_comment=(f"p={dmarc.record.get('p', 'none').upper()} "
                            f"sp={dmarc.record.get('sp', dmarc.record.get('p', 'none')).upper()} "
                            f"dis={dmarc.disposition.upper()}") if dmarc.record else None))
    arc = ctx.data.get("arc")
    if arc is not None:
        res = authres.arc.ARCAuthenticationResult(
            result=arc.result, reason=_clean(arc.reason) if arc.result == "fail" else None,
            smtp_remote_ip=ctx.session.peer_ip or None)
        if arc.result == "pass" and arc.oldest_pass:
            res.header_oldest_pass = str(arc.oldest_pass)
        results.append(res)
    return authres.AuthenticationResultsHeader(authserv_id=authserv_id(ctx.config),
                                               results=results).header_value()


def _ctx(data, helo="mail.example.com", ip="192.0.2.7"):
    from types import SimpleNamespace

    from filterd.config import Config

    cfg = Config({"auth": {"authserv_id": "MX.Example.Net"}, "server": {"hostname": ""}},
                 None, None)
    return SimpleNamespace(data=data, session=Session(peer_ip=ip, helo=helo), config=cfg)


def _result_sets():
    from types import SimpleNamespace as NS

    spf = NS(identity="mailfrom", result="Pass", sender="bounce+x=y@news.example.com")
    spf_helo = NS(identity="helo", result="softfail", sender="")
    signed = NS(result="pass", bits=2048, reason="", domain="example.com",
                identity="@example.com", selector="sel-2026", algorithm="rsa-sha256",
                b_prefix="dGhpcyBp")
    broken = NS(result="fail", bits=1024, reason='body hash did not verify ("bh" \\ mismatch)\r\n',
                domain="lists.example.org", identity="", selector="s1", algorithm="ed25519-sha256",
                b_prefix="")
    odd = NS(result="permerror", bits=0, reason="key r\u00e9voqu\u00e9e; see <x>", domain="",
             identity="", selector="", algorithm="", b_prefix="")
    dmarc_fail = NS(result="fail", reason="neither SPF nor DKIM aligned", domain="example.com",
                    policy="reject", record={"p": "reject"}, disposition="quarantine")
    dmarc_sp = NS(result="pass", reason="", domain="sub.example.com", policy="none",
                  record={"p": "quarantine", "sp": "none"}, disposition="none")
    dmarc_none = NS(result="none", reason="no DMARC record", domain="example.org", policy="",
                    record=None, disposition="")
    yield {}
    yield {"spf": {"mailfrom": spf, "helo": spf}}
    yield {"spf": {"mailfrom": spf_helo, "helo": None}, "dkim": []}
    yield {"spf": {"mailfrom": spf, "helo": spf_helo}, "dkim": [signed, broken, odd],
           "dmarc": dmarc_fail, "arc": NS(result="pass", reason="", oldest_pass=1)}
    yield {"dkim": [signed], "dmarc": dmarc_sp,
           "arc": NS(result="fail", reason='AMS i=2 "broken"', oldest_pass=0)}
    yield {"dmarc": dmarc_none, "arc": NS(result="none", reason="", oldest_pass=0)}


def test_our_authentication_results_equal_authres_own_output_and_parse_back():
    from filterd.auth import build_authres

    for data in _result_sets():
        for helo, ip in (("mail.example.com", "192.0.2.7"), ("", ""), ("[192.0.2.7]", "::1")):
            ctx = _ctx(data, helo, ip)
            ours = build_authres(ctx)
            assert ours == authres_reference(ctx), data
            parsed = parse(ours)
            assert parsed.authserv_id == "mx.example.net"
            spf = data.get("spf") or {}
            methods = ["spf"] * len({id(v) for v in spf.values() if v is not None})
            methods += ["dkim"] * max(1, len(data["dkim"])) if "dkim" in data else []
            methods += [m for m in ("dmarc", "arc") if m in data]
            assert [r.method for r in parsed.results] == methods, ours
