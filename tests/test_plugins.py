"""The plugin host: built-ins, entry-point packages and site plugins load through one mechanism;
a plugin that raises or hangs never crashes the pipeline and follows its error policy."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import ROOT, check_json, make_message, run_filterd
from filterd import hookspecs

DOCS = (ROOT / "docs" / "hooks.md").read_text()


def write_plugin(directory: Path, name: str, code: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.py"
    path.write_text(textwrap.dedent(code))
    return path


# -- documentation -----------------------------------------------------------------------------
def declared_hooks() -> list[str]:
    return [n for n in dir(hookspecs) if callable(getattr(hookspecs, n))
            and hasattr(getattr(hookspecs, n), "filterd_spec")]


def test_every_hookspec_is_documented_with_an_example():
    hooks = declared_hooks()
    assert set(hookspecs.PHASE_HOOKS + hookspecs.EVENT_HOOKS
               + hookspecs.LIFECYCLE_HOOKS) == set(hooks)
    for name in hooks:
        assert (getattr(hookspecs, name).__doc__ or "").strip(), f"hookspec {name} has no docstring"
        m = re.search(rf"^### {name}\n(.*?)(?=^### |^## )", DOCS, re.M | re.S)
        assert m, f"docs/hooks.md has no section '### {name}'"
        assert "```python" in m.group(1) and "@hookimpl" in m.group(1), \
            f"docs/hooks.md section {name} has no example hookimpl"


def site_plugin_from_docs() -> str:
    m = re.search(r"## A complete site plugin.*?```python\n(.*?)```", DOCS, re.S)
    assert m, "the complete site plugin example is missing from docs/hooks.md"
    return m.group(1)


def test_the_documented_site_plugin_loads_and_runs(tmp_path):
    write_plugin(tmp_path / "plugins.d", "shouting", site_plugin_from_docs())
    msg = make_message(subject="THIS IS A VERY LOUD SUBJECT")
    rc, out = check_json(msg, "--rcpt", "a@example.org",
                         "--set", f"plugins.site_dir={tmp_path / 'plugins.d'}",
                         "--set", "shouting.score=7.0", "--set", "spam_headers.add=always")
    sym = next(s for s in out["symbols"] if s["name"] == "SHOUTING_SUBJECT")
    assert sym["score"] == 7.0 and sym["options"] == ["100%"]
    assert {"name": "X-Shouting", "value": "yes"} in out["headers"]
    assert out["action"] == "add_header"
    proc = run_filterd("plugins", "--set", f"plugins.site_dir={tmp_path / 'plugins.d'}")
    line = next(ln for ln in proc.stdout.decode().splitlines() if ln.startswith("shouting"))
    assert "enabled" in line and "data" in line and "modify" in line


def test_a_plugin_setting_of_the_wrong_type_is_reported_by_config_check(tmp_path):
    write_plugin(tmp_path / "p", "shouting", site_plugin_from_docs())
    proc = run_filterd("config", "check", "--set", f"plugins.site_dir={tmp_path / 'p'}",
                       "--set", "shouting.min_letters=lots")
    assert proc.returncode == 2
    assert b"[shouting] min_letters: expected an integer, got 'lots'" in proc.stderr


# -- third-party package through the entry point ------------------------------------------------
@pytest.mark.timeout(300)
def test_a_plugin_installed_as_a_package_is_picked_up_by_its_entry_point(tmp_path):
    pkg = tmp_path / "filterd-hello"
    (pkg / "filterd_hello").mkdir(parents=True)
    (pkg / "pyproject.toml").write_text(textwrap.dedent("""
        [build-system]
        requires = ["setuptools>=61"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "filterd-hello"
        version = "1.0"

        [project.entry-points."filterd.plugins"]
        hello = "filterd_hello"
    """))
    (pkg / "filterd_hello" / "__init__.py").write_text(textwrap.dedent('''
        """Hello: a third-party test plugin that marks every message."""
        from filterd.hookspecs import hookimpl

        CONFIG = """
        weight = 0.25
        """

        @hookimpl
        def data(ctx, options):
            ctx.add_symbol("HELLO_PLUGIN", options["weight"], description="third-party plugin ran")
    '''))
    target = tmp_path / "site-packages"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-build-isolation",
                    "--no-deps", "--target", str(target), str(pkg)], check=True,
                   capture_output=True, timeout=240)
    env = {"PYTHONPATH": str(target)}
    rc, out = check_json(make_message(), "--rcpt", "a@example.org", "--set", "hello.weight=0.5",
                         env=env)
    hello_sym = next(s for s in out["symbols"] if s["name"] == "HELLO_PLUGIN")
    assert hello_sym["score"] == 0.5 and hello_sym["description"] == "third-party plugin ran"
    listing = json.loads(run_filterd("plugins", "--json", env=env).stdout)
    hello = next(p for p in listing if p["name"] == "hello")
    assert hello["origin"] == "entry point filterd-hello"
    assert hello["hooks"] == ["data"] and hello["state"] == "enabled"


# -- failures ----------------------------------------------------------------------------------
RAISING = """
from filterd.hookspecs import hookimpl

@hookimpl
def data(ctx):
    raise RuntimeError("database is on fire")
"""

HANGING = """
import asyncio
from filterd.hookspecs import hookimpl

@hookimpl
async def data(ctx):
    await asyncio.sleep(3600)
"""

BROKEN_IMPORT = """
import this_module_does_not_exist
"""


async def test_a_raising_plugin_tempfails_the_message_by_default(tmp_path, pipeline_factory):
    write_plugin(tmp_path / "p", "onfire", RAISING)
    pipe = await pipeline_factory(f"plugins.site_dir={tmp_path / 'p'}")
    result = await pipe.scan(make_message(), "a@example.com", ["b@example.org", "c@example.org"])
    for outcome in result.outcomes.values():
        assert outcome.action.value == "tempfail"
        assert outcome.verdict.smtp_reply()[:2] == (451, "4.3.0")
        assert "onfire" in outcome.verdict.reason
    err = next(s for s in result.symbols if s.name == "PLUGIN_ERROR")
    assert err.options == ["onfire"] and "database is on fire" in err.description
    # the other plugins still ran
    rules = await pipe.scan(make_message("XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-"
                                         "TEST-EMAIL*C.34X"), "a@example.com", ["b@example.org"])
    assert "GTUBE" in [s.name for s in rules.symbols]
    assert rules.outcomes["b@example.org"].action.value == "reject"


async def test_a_raising_plugin_with_skip_policy_only_records_a_symbol(tmp_path, pipeline_factory):
    write_plugin(tmp_path / "p", "onfire", RAISING)
    pipe = await pipeline_factory(f"plugins.site_dir={tmp_path / 'p'}", "onfire.on_error=skip")
    result = await pipe.scan(make_message(), "a@example.com", ["b@example.org"])
    assert result.outcomes["b@example.org"].action.value == "accept"
    assert "PLUGIN_ERROR" in [s.name for s in result.symbols]


async def test_a_hanging_plugin_is_cut_off_by_its_timeout(tmp_path, pipeline_factory):
    write_plugin(tmp_path / "p", "sleepy", HANGING)
    pipe = await pipeline_factory(f"plugins.site_dir={tmp_path / 'p'}", "sleepy.timeout=200ms")
    result = await pipe.scan(make_message(), "a@example.com", ["b@example.org"])
    assert result.outcomes["b@example.org"].action.value == "tempfail"
    sym = next(s for s in result.symbols if s.name == "PLUGIN_TIMEOUT")
    assert sym.options == ["sleepy"] and "timed out after 0.2s" in sym.description


IDLE = """
from filterd.hookspecs import hookimpl

def idle_hooks():
    {body}

@hookimpl
def data(ctx):
    raise RuntimeError("an idle hook was called")

@hookimpl
def decide(ctx):
    ctx.add_symbol("IDLE_PLUGIN_DECIDED", 0.0)
"""


@pytest.mark.parametrize("body, data_called", [
    ('return {"data"}', False),
    ("return set()", True),
    ('raise RuntimeError("cannot tell")', True),  # when unsure, every hook is called
])
async def test_hooks_a_plugin_calls_idle_are_not_called_and_the_others_are(
        tmp_path, pipeline_factory, body, data_called):
    write_plugin(tmp_path / "p", "idler", IDLE.format(body=body))
    pipe = await pipeline_factory(f"plugins.site_dir={tmp_path / 'p'}")
    result = await pipe.scan(make_message(), "a@example.com", ["b@example.org"])
    names = [s.name for s in result.symbols]
    assert "IDLE_PLUGIN_DECIDED" in names
    assert ("PLUGIN_ERROR" in names) is data_called
    assert result.outcomes["b@example.org"].action.value == ("tempfail" if data_called
                                                             else "accept")


async def test_unconfigured_builtins_are_idle_until_configured(tmp_path, pipeline_factory):
    """ClamAV without clamd, DNSBL without zones, DKIM without signing keys, ARC without
    sealing, Bayes without learn addresses, quotas without local domains, aliases without
    an alias, list or virtual domain: not called for what they have nothing to do in.
    Configured, they are called again."""
    pipe = await pipeline_factory()
    assert pipe.host.idle == {
        "clamav": {"data", "decide"}, "dnsbl": {"data"}, "dkim": {"modify"},
        "arc": {"modify"}, "bayes": {"rcpt_to", "decide"},
        "mailbox_quota": {"rcpt_to", "data"}, "aliases": {"rcpt_to"}}
    assert "clamav" not in [i.plugin_name for i in pipe.host.impls("data")]
    configured = await pipeline_factory(
        "clamav.socket=127.0.0.1:9", "dnsbl.ip_zones={'zen.example' = {'127.0.0.2' = 'RBL'}}",
        "bayes.learn_spam_addresses=['spam@example.org']", "delivery.local_domains=['example.org']",
        "aliases.virtual_domains=['virtual.example']")
    assert set(configured.host.idle) == {"dkim", "arc"}
    assert "clamav" in [i.plugin_name for i in configured.host.impls("data")]


def test_a_plugin_that_fails_to_import_is_named_and_the_rest_keep_working(tmp_path):
    write_plugin(tmp_path / "p", "broken", BROKEN_IMPORT)
    site = f"plugins.site_dir={tmp_path / 'p'}"
    proc = run_filterd("plugins", "--set", site)
    text = proc.stdout.decode()
    assert "broken" in text and "No module named 'this_module_does_not_exist'" in text
    assert proc.returncode == 1
    # default policy: a filter that cannot run tempfails mail instead of passing it unscanned
    rc, out = check_json(make_message(), "--rcpt", "a@example.org", "--set", site)
    assert out["action"] == "tempfail"
    # with skip, mail flows and the rules still run
    rc, out = check_json(make_message("XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-"
                                      "EMAIL*C.34X"), "--rcpt", "a@example.org", "--set", site,
                         "--set", "plugins.on_error=skip")
    assert out["action"] == "reject" and "GTUBE" in [s["name"] for s in out["symbols"]]
    assert any(s["name"] == "PLUGIN_ERROR" and s["options"] == ["broken"] for s in out["symbols"])


def test_a_disabled_plugin_does_not_run(tmp_path):
    write_plugin(tmp_path / "p", "onfire", RAISING)
    rc, out = check_json(make_message(), "--rcpt", "a@example.org",
                         "--set", f"plugins.site_dir={tmp_path / 'p'}",
                         "--set", "plugins.disabled=['onfire']")
    assert out["action"] == "accept"


async def test_the_shipped_testing_helper_scans_with_a_site_plugin(tmp_path):
    from filterd.testing import scan, symbol_names

    write_plugin(tmp_path / "p", "shouting", site_plugin_from_docs())
    result = await scan(make_message(subject="A SUBJECT THAT SHOUTS"),
                        overrides=[f"plugins.site_dir={tmp_path / 'p'}"], state_dir=tmp_path)
    assert "SHOUTING_SUBJECT" in symbol_names(result)


async def test_hooks_that_finish_at_once_are_answered_without_a_coroutine_and_others_awaited(
        pipeline_factory):
    """The host's fast path (start_one): a plain hook, or an async one that never waits, gives
    its (result, failure) at once; a hook that waits gives a coroutine that finishes it under
    the plugin's timeout; a hook that raises gives the error policy's failure either way."""
    import asyncio
    from types import SimpleNamespace

    from filterd.verdict import Verdict

    host = (await pipeline_factory()).host

    def impl(fn):
        return SimpleNamespace(plugin_name="rules", argnames=("ctx", "x"), function=fn)

    async def no_wait(ctx, x):
        return x + 1

    async def waits(ctx, x):
        await asyncio.sleep(0)
        return x + 2

    def breaks(ctx, x):
        raise ValueError("broken")

    async def breaks_later(ctx, x):
        await asyncio.sleep(0)
        raise ValueError("broken later")

    args = {"ctx": None, "x": 1}
    assert host.start_one(impl(lambda ctx, x: x), args) == (1, None)
    assert host.start_one(impl(no_wait), args) == (2, None)
    pending = host.start_one(impl(waits), args)
    assert pending.__class__ is not tuple and await pending == (3, None)
    for fn in (breaks, breaks_later):
        done = host.start_one(impl(fn), args)
        result, failure = done if done.__class__ is tuple else await done
        assert result is None and isinstance(failure, Verdict) and failure.code == 451
        assert await host.call_one(impl(fn), args) == (None, failure)
