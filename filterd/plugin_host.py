"""The plugin host: finds plugins, registers them with pluggy, and calls their hooks with a
timeout and an error policy.

Three sources, one mechanism:

1. built-ins: every module (or package) of ``plugins/`` (installed as ``filterd_plugins``);
2. third-party packages declaring an entry point in the group ``filterd.plugins``
   (``name = "package.module"`` or ``"package.module:object"``);
3. site plugins: every ``*.py`` file or package in ``[plugins] site_dir``.

A plugin is a module (or object) with :data:`filterd.hookspecs.hookimpl` functions. If it has a
``Plugin`` class (or the entry point names a class), one instance is made per pipeline with
``Plugin(options=<its config section>, services=<Services>)`` so state is not global. A
module-level ``CONFIG`` string holds the plugin's annotated default config (its section,
without the ``[name]`` header); the name of the plugin is the name of its config section.
"""
from __future__ import annotations

import asyncio
import importlib
import importlib.metadata
import importlib.util
import inspect
import logging
import pkgutil
import sys
import types
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pluggy

from . import hookspecs
from .config import Config, parse_duration
from .verdict import Verdict

_Coroutine = types.CoroutineType

log = logging.getLogger("filterd.plugins")


@dataclass
class PluginInfo:
    name: str
    origin: str  # "builtin", "entry point <dist>", "site <path>"
    target: Any = None  # module, class or object
    config_text: str = ""
    error: str = ""  # load error, "" when loaded
    instance: Any = None
    enabled: bool = True
    hooks: list[str] = field(default_factory=list)

    @property
    def description(self) -> str:
        doc = inspect.getdoc(self.target) if self.target is not None else ""
        return (doc or "").strip().splitlines()[0] if doc else ""


def _load_site_module(path: Path):
    mod_name = f"filterd_site_{path.stem}"
    if path.is_dir():
        init = path / "__init__.py"
        spec = importlib.util.spec_from_file_location(mod_name, init,
                                                      submodule_search_locations=[str(path)])
    else:
        spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    spec.loader.exec_module(module)
    return module


def discover(plugins_section: dict) -> list[PluginInfo]:
    """Find every available plugin. Import errors are recorded in ``PluginInfo.error`` (with the
    culprit's name and origin), never raised: one broken plugin must not stop the others."""
    found: list[PluginInfo] = []
    seen: set[str] = set()

    def add(name: str, origin: str, loader) -> None:
        if name in seen:
            found.append(PluginInfo(name, origin, error=f"duplicate plugin name {name!r} "
                                    f"(already loaded from another source); rename one"))
            return
        seen.add(name)
        try:
            target = loader()
            text = getattr(target, "CONFIG", "") or ""
            if not text and inspect.isclass(target):
                text = getattr(sys.modules.get(target.__module__), "CONFIG", "") or ""
            found.append(PluginInfo(name, origin, target, text))
        except Exception as exc:  # noqa: BLE001 - report any import failure with its culprit
            tb = traceback.format_exception_only(type(exc), exc)[-1].strip()
            found.append(PluginInfo(name, origin, error=f"failed to load: {tb}"))

    import filterd_plugins

    for mod in sorted(pkgutil.iter_modules(filterd_plugins.__path__), key=lambda m: m.name):
        if mod.name.startswith("_"):
            continue
        add(mod.name, "builtin",
            lambda n=mod.name: importlib.import_module(f"filterd_plugins.{n}"))

    if plugins_section.get("entry_points", True):
        for ep in sorted(importlib.metadata.entry_points(group="filterd.plugins"),
                         key=lambda e: e.name):
            dist = getattr(ep, "dist", None)
            origin = f"entry point {dist.name if dist else ep.value}"
            add(ep.name, origin, ep.load)

    site_dir = plugins_section.get("site_dir") or ""
    if site_dir:
        d = Path(site_dir)
        if not d.is_dir():
            found.append(PluginInfo("site_dir", f"site {d}",
                                    error=f"[plugins] site_dir {d} is not a directory"))
        else:
            for p in sorted(d.iterdir()):
                if p.name.startswith(("_", ".")):
                    continue
                if (p.suffix == ".py" and p.is_file()) or (p / "__init__.py").is_file():
                    add(p.stem, f"site {p}", lambda p=p: _load_site_module(p))
    return found


class PluginError(Exception):
    pass


@types.coroutine
def _resume(coro, first):
    """Go on awaiting ``coro``, which already ran up to its first suspension and yielded
    ``first`` (what ``await coro`` would have handed to the task at that point)."""
    pending = first
    while True:
        try:
            sent = yield pending
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as exc:  # cancellation, timeout: deliver it where coro waits
            try:
                pending = coro.throw(exc)
            except StopIteration as done:
                return done.value
        else:
            try:
                pending = coro.send(sent)
            except StopIteration as done:
                return done.value


class PluginHost:
    """Registers the enabled plugins and runs their hooks in the configured order."""

    def __init__(self, config: Config, infos: list[PluginInfo], services):
        self.config = config
        self.services = services
        self._options: dict[str, dict] = {}
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.infos = infos
        section = config.section("plugins")
        disabled = set(section.get("disabled", []))
        self.default_timeout = parse_duration(section.get("timeout", "10s"))
        self.default_on_error = section.get("on_error", "tempfail")
        order = list(section.get("order", []))
        last = [n for n in section.get("order_last", []) if n not in order]
        by_name = {i.name: i for i in infos if not i.error}
        names = [n for n in order if n in by_name] + [i.name for i in infos
                                                      if not i.error and i.name not in order
                                                      and i.name not in last]
        names += [n for n in last if n in by_name]
        self.order: list[str] = []
        for name in names:
            info = by_name[name]
            opts = self.options(name)
            info.enabled = name not in disabled and opts.get("enabled", True)
            if not info.enabled:
                continue
            target = info.target
            if inspect.ismodule(target) and inspect.isclass(getattr(target, "Plugin", None)):
                target = target.Plugin
            try:
                obj = target(options=opts, services=services) if inspect.isclass(target) \
                    else target
            except Exception as exc:  # noqa: BLE001 - name the plugin, keep the others
                info.error = f"failed to initialise: {type(exc).__name__}: {exc}"
                info.enabled = False
                continue
            info.instance = obj
            try:
                self.pm.register(obj, name=name)
            except (ValueError, pluggy.PluginValidationError) as exc:
                info.error = f"invalid plugin: {exc}"
                info.enabled = False
                continue
            info.hooks = sorted(h.name for h in self.pm.get_hookcallers(obj) or [])
            self.order.append(name)
        self.failed = [i for i in infos if i.error]
        for i in self.failed:
            log.error("plugin %s (%s) %s", i.name, i.origin, i.error)
        self._impls: dict[str, list] = {}
        self._timeouts: dict[str, float] = {}
        self.idle: dict[str, set[str]] = {}  # plugin name -> hooks it has nothing to do in

    # -- configuration per plugin -------------------------------------------------------------
    def options(self, name: str) -> dict:
        opts = self._options.get(name)
        if opts is None:  # the section's own dict: looked up once per plugin, not per call
            opts = self.config.section(name)
            opts = self._options[name] = opts if isinstance(opts, dict) else {}
        return opts

    def timeout(self, name: str) -> float:
        cached = self._timeouts.get(name)
        if cached is None:
            t = self.options(name).get("timeout") or ""
            cached = self._timeouts[name] = parse_duration(t) if t else self.default_timeout
        return cached

    def on_error(self, name: str) -> str:
        return self.options(name).get("on_error") or self.default_on_error

    def impls(self, hook: str) -> list:
        """Hook implementations in configured plugin order."""
        if hook not in self._impls:
            caller = getattr(self.pm.hook, hook)
            by_plugin = {i.plugin_name: i for i in caller.get_hookimpls()}
            ordered = [by_plugin[n] for n in self.order
                       if n in by_plugin and hook not in self.idle.get(n, ())]
            # @hookimpl(tryfirst=True) / (trylast=True) move one hook of a plugin to the front
            # or back of its phase; the configured order holds within each group (so the auth
            # checks can run first in `data` while their signers run last in `modify`)
            self._impls[hook] = ([i for i in ordered if i.tryfirst] +
                                 [i for i in ordered if not (i.tryfirst or i.trylast)] +
                                 [i for i in ordered if i.trylast])
        return self._impls[hook]

    def wants(self, hook: str, session=None, address: str | None = None) -> bool:
        """Would some plugin act in early phase ``hook`` (for this ``session`` and recipient
        ``address``; without a session: for some session)? Front doors where calling a phase
        costs a round trip ask this first (the milter: the MTA waits for a reply) and run the
        phase later, at end of message and in order, when no plugin wants it now.

        A plugin answers through an optional ``wants(hook, session, address)`` method (see
        docs/hooks.md, "Answering early only when needed"); a plugin without one always wants
        its hooks. ``wants`` is called synchronously from the milter's protocol handling (on the
        event loop, or in a libmilter thread with the pymilter engine): it may only read its
        configuration and the session, never await, block or change state."""
        for impl in self.impls(hook):
            fn = getattr(impl.plugin, "wants", None)
            if fn is None:
                return True
            try:
                if fn(hook, session, address):
                    return True
            except Exception:  # noqa: BLE001 - when unsure, the hook runs at its own step
                log.exception("plugin %s: wants(%r) failed; calling the hook at its step",
                              impl.plugin_name, hook)
                return True
        return False

    # -- calling ------------------------------------------------------------------------------
    async def call_one(self, impl, kwargs: dict, ctx=None):
        """Call one hook implementation under its timeout and error policy.

        Returns ``(result, failure)``: failure is ``None`` on success, else a tempfail Verdict
        (policy ``tempfail``) or the string ``"skipped"`` (policy ``skip``)."""
        done = self.start_one(impl, kwargs, ctx)
        return done if done.__class__ is tuple else await done

    def start_one(self, impl, kwargs: dict, ctx=None):
        """:meth:`call_one` without a coroutine of its own for the hooks that finish at once
        (most of them: a message makes ~20 hook calls): ``(result, failure)``, or, when the
        hook has to wait, a coroutine that finishes it and returns that pair."""
        name = impl.plugin_name
        argnames = impl.argnames
        if "options" in argnames:
            kwargs["options"] = self.options(name)  # each plugin its own section
        try:
            # pluggy's argnames are the function's parameters in order: positional arguments
            # cost less than a dict per call
            result = impl.function(*map(kwargs.get, argnames))
            if result.__class__ is _Coroutine:
                # Most async hooks finish without ever waiting (cached DNS, local data): run the
                # coroutine to its first suspension and only then arm the timeout (a timer per
                # hook call is a measurable share of a scan otherwise)
                try:
                    first = result.send(None)
                except StopIteration as done:
                    return done.value, None
                return self._finish(impl, _resume(result, first), ctx)
            if result is not None and inspect.isawaitable(result):
                return self._finish(impl, result, ctx)
            return result, None
        # a crashing plugin must never crash the server (a cancellation is no Exception)
        except Exception as exc:  # noqa: BLE001
            return None, self._raised(impl, exc, ctx)

    async def _finish(self, impl, awaitable, ctx):
        """The rest of a hook call that waits: under the plugin's timeout."""
        try:
            async with asyncio.timeout(self.timeout(impl.plugin_name)):
                return await awaitable, None
        except Exception as exc:  # noqa: BLE001
            return None, self._raised(impl, exc, ctx)

    def _raised(self, impl, exc: Exception, ctx):
        """The failure (error policy) for a hook that raised ``exc``, logged and reported."""
        name, hook = impl.plugin_name, impl.function.__name__
        if isinstance(exc, TimeoutError):  # the plugin's timeout (or a TimeoutError it raised)
            what, symbol = f"timed out after {self.timeout(name):g}s in hook {hook}", \
                "PLUGIN_TIMEOUT"
            log.error("plugin %s %s", name, what)
        else:
            what, symbol = f"raised {type(exc).__name__}: {exc} in hook {hook}", "PLUGIN_ERROR"
            log.error("plugin %s %s", name, what, exc_info=exc)
        return self._failure(name, what, symbol, ctx)

    def _failure(self, name: str, what: str, symbol: str, ctx):
        if ctx is not None:
            ctx.add_symbol(symbol, 0.0, options=[name], description=f"plugin {name} {what}",
                           source="host")
            ctx.errors.append(f"plugin {name} {what}")
        if self.on_error(name) == "skip":
            return "skipped"
        return Verdict.tempfail(f"Temporary local problem (filter {name}); please try again later",
                                code=451, enhanced="4.3.0", source=name)

    async def call_first(self, hook: str, ctx, **kwargs) -> Verdict | None:
        """Early phases: the first non-None verdict (other than CONTINUE) wins."""
        kwargs["ctx"] = ctx
        for impl in self.impls(hook):
            done = self.start_one(impl, kwargs, ctx)
            result, failure = done if done.__class__ is tuple else await done
            if isinstance(failure, Verdict):
                return failure
            if isinstance(result, Verdict) and result.is_final():
                result.source = result.source or impl.plugin_name
                return result
        return None

    async def call_all(self, hook: str, ctx, **kwargs) -> list[tuple[str, Any]]:
        """Every plugin runs; returns ``[(plugin name, result)]`` for non-None results. A plugin
        failing under the ``tempfail`` policy tempfails every recipient of ``ctx`` right here."""
        kwargs["ctx"] = ctx
        out = []
        for impl in self.impls(hook):
            done = self.start_one(impl, kwargs, ctx)
            result, failure = done if done.__class__ is tuple else await done
            if isinstance(failure, Verdict):
                ctx.set_verdict(failure)
            elif result is not None:
                out.append((impl.plugin_name, result))
        return out

    async def notify(self, hook: str, **kwargs) -> None:
        """Events after the fact: errors are logged and never propagate."""
        ctx = kwargs.get("ctx")
        for impl in self.impls(hook):
            done = self.start_one(impl, kwargs, ctx)
            if done.__class__ is not tuple:
                await done

    async def startup(self) -> None:
        for impl in self.impls("startup"):
            args = {"options": self.options(impl.plugin_name), "services": self.services}
            try:
                r = impl.function(**{a: args[a] for a in impl.argnames})
                if inspect.isawaitable(r):
                    await asyncio.wait_for(r, max(self.timeout(impl.plugin_name), 30))
            except Exception as exc:  # noqa: BLE001
                raise PluginError(f"plugin {impl.plugin_name} failed to start: "
                                  f"{type(exc).__name__}: {exc}") from exc
        self._ask_idle()

    def _ask_idle(self) -> None:
        """Ask each plugin, once it has started, which of its hooks have nothing to do with its
        configuration (an optional plain method ``idle_hooks()``, see docs/hooks.md): those
        are not called at all. A plugin that cannot say is called for every hook."""
        for name in self.order:
            fn = getattr(self.pm.get_plugin(name), "idle_hooks", None)
            if fn is None:
                continue
            try:
                hooks = {h for h in fn() or () if h not in ("startup", "shutdown")}
            except Exception:  # noqa: BLE001 - when unsure, every hook is called
                log.exception("plugin %s: idle_hooks() failed; calling all its hooks", name)
                continue
            if hooks:
                self.idle[name] = hooks
                log.debug("plugin %s: not called for %s (nothing to do as configured)", name,
                          ", ".join(sorted(hooks)))
        self._impls.clear()

    async def shutdown(self) -> None:
        for impl in self.impls("shutdown"):
            args = {"options": self.options(impl.plugin_name), "services": self.services}
            try:
                r = impl.function(**{a: args[a] for a in impl.argnames})
                if inspect.isawaitable(r):
                    await asyncio.wait_for(r, 10)
            except Exception:  # noqa: BLE001
                log.exception("plugin %s failed to shut down cleanly", impl.plugin_name)
