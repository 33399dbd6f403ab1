"""Quarantine web pages, served by filterd itself (aiohttp).

Why aiohttp and not a hand-made asyncio HTTP server: form parsing, cookies, keep-alive and
HTTP edge cases (pipelining, chunking, header limits) are exactly what a hand-written parser gets
wrong; aiohttp is the maintained asyncio server, and filterd already runs on asyncio.

Routes (every page carries ``Referrer-Policy: same-origin``, a strict CSP and ``no-store``):

- ``GET  /q/a/<token>``  confirmation page for one action — never acts (mail scanners and
  link previews prefetch links);
- ``POST /q/a/<token>``  performs it; needs the CSRF value of the confirmation page, which is
  bound to a per-browser cookie and to the token;
- ``GET  /q/login?u=<address>&t=<token>``  signed login link → session cookie → ``/q/list``;
- ``GET  /q/list``  everything held for the signed-in user, with buttons, lists and the digest
  frequency; ``POST /q/list/act`` and ``POST /q/prefs`` act with the session's CSRF value;
- ``GET  /healthz``;
- ``GET|POST /lists/unsubscribe?list=&member=&token=``  mailing lists' RFC 8058 one-click
  unsubscribe (GET shows a button; the POST with ``List-Unsubscribe=One-Click`` acts).
"""
from __future__ import annotations

import base64
import logging
import secrets
import time
from urllib.parse import urlsplit

from aiohttp import web

from ..quarantine.service import ActionError
from ..reports.render import make_env

log = logging.getLogger("filterd.web")

ACTION_TITLES = {
    "release": "Release this message",
    "delete": "Delete this message",
    "allow": "Always allow this sender",
    "block": "Always block this sender",
}
CSRF_COOKIE = "fq_csrf"
SESSION_COOKIE = "fq_session"
FREQUENCIES = ("hourly", "daily", "weekly", "never")


def _b64(s: str) -> str:
    return base64.urlsafe_b64encode(s.encode()).decode().rstrip("=")


def _unb64(s: str) -> str:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4)).decode()


class QuarantineWeb:
    def __init__(self, service):
        self.service = service
        self.env = make_env(service.config)
        self.secure = service.base_url.startswith("https:")
        self.runner: web.AppRunner | None = None
        self.port = 0
        app = web.Application(middlewares=[self._headers], client_max_size=64 * 1024)
        app.router.add_get("/q/a/{token}", self.confirm)
        app.router.add_post("/q/a/{token}", self.act)
        app.router.add_get("/q/login", self.login)
        app.router.add_get("/q/list", self.list_page)
        app.router.add_post("/q/list/act", self.list_act)
        app.router.add_post("/q/prefs", self.prefs)
        app.router.add_get("/healthz", self.health)
        app.router.add_get("/lists/unsubscribe", self.list_unsubscribe_page)
        app.router.add_post("/lists/unsubscribe", self.list_unsubscribe)
        self.app = app

    # -- server lifecycle ---------------------------------------------------------------------
    async def start(self, listen: str) -> int:
        host, _, port = listen.rpartition(":")
        host = host.strip("[]") or "127.0.0.1"
        self.runner = web.AppRunner(self.app, access_log=None)
        await self.runner.setup()
        # reuse_port: every worker of `filterd serve` (and the new pipeline of a reload, while
        # the old one drains) serves the pages on the same port; all state is in the store
        site = web.TCPSite(self.runner, host, int(port), reuse_port=True)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # the real port when 0 was asked
        log.info("quarantine web pages on http://%s:%d/ (base_url %s)", host, self.port,
                 self.service.base_url)
        return self.port

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    # -- helpers ------------------------------------------------------------------------------
    @web.middleware
    async def _headers(self, request, handler):
        try:
            resp = await handler(request)
        except web.HTTPException as exc:
            self._secure_headers(exc)
            raise
        self._secure_headers(resp)
        return resp

    @staticmethod
    def _secure_headers(resp) -> None:
        resp.headers["Content-Security-Policy"] = (
            "default-src 'none'; style-src 'unsafe-inline'; img-src data:; form-action 'self'; "
            "frame-ancestors 'none'; base-uri 'none'")
        # same-origin: tokens in our URLs never leak to other sites in a Referer, and the browser
        # still sends a real Origin on our own form posts (with no-referrer it sends "null")
        resp.headers["Referrer-Policy"] = "same-origin"
        resp.headers["X-Content-Type-Options"] = "nosniff"
        resp.headers["Cache-Control"] = "no-store"

    def page(self, template: str, status: int = 200, **ctx) -> web.Response:
        html = self.env.get_template(template).render(**ctx)
        return web.Response(text=html, status=status, content_type="text/html", charset="utf-8")

    def error(self, message: str, status: int = 400) -> web.Response:
        return self.page("page_error.html.j2", status=status, message=message)

    def _cookie(self, resp: web.Response, name: str, value: str, max_age: int | None = None):
        resp.set_cookie(name, value, httponly=True, samesite="Lax", secure=self.secure,
                        path="/q/", max_age=max_age)

    def _same_origin(self, request) -> bool:
        """Refuse cross-site form posts when the browser tells us where they come from."""
        if request.headers.get("Sec-Fetch-Site", "same-origin") not in ("same-origin", "none"):
            return False
        origin = request.headers.get("Origin")
        if not origin or origin == "null":
            return origin is None
        o = urlsplit(origin)
        allowed = {urlsplit(self.service.base_url).netloc, request.host}
        return o.netloc in allowed

    # -- one action from a digest link --------------------------------------------------------
    async def confirm(self, request):
        token = request.match_info["token"]
        try:
            entry, action = await self.service.entry_for_token(token)
        except ActionError as exc:
            return self.error(str(exc), 403)
        if entry.status != "held" and action in ("release", "delete"):
            return self.error(f"This message was already {entry.status}.", 410)
        browser = request.cookies.get(CSRF_COOKIE) or secrets.token_urlsafe(18)
        csrf = self.service.signer.mac("csrf", browser, token)
        resp = self.page("page_confirm.html.j2", entry=entry.to_dict(), action=action,
                         title=ACTION_TITLES[action], token=token, csrf=csrf)
        if CSRF_COOKIE not in request.cookies:
            self._cookie(resp, CSRF_COOKIE, browser)
        return resp

    async def act(self, request):
        token = request.match_info["token"]
        form = await request.post()
        browser = request.cookies.get(CSRF_COOKIE, "")
        if not self._same_origin(request) or not browser or not self.service.signer.check_mac(
                str(form.get("csrf", "")), "csrf", browser, token):
            return self.error("This form expired or did not come from this site. Open the link "
                              "from your digest again.", 403)
        try:
            entry, action = await self.service.entry_for_token(token)
            text = await self.service.perform(entry, action, by="web")
        except ActionError as exc:
            return self.error(str(exc), 409)
        return self.page("page_result.html.j2", message=text, entry=entry.to_dict(),
                         action=action)

    # -- per-user list ------------------------------------------------------------------------
    def _session(self, request) -> tuple[str, str] | None:
        raw = request.cookies.get(SESSION_COOKIE, "")
        try:
            user_b, exp, sig = raw.split(".")
            user = _unb64(user_b)
        except ValueError:
            return None
        if int(exp, 36) < time.time() or \
                not self.service.signer.check_mac(sig, "session", user, exp):
            return None
        return user, raw

    async def login(self, request):
        user = (request.query.get("u") or "").strip().lower()
        try:
            self.service.verify_login(user, request.query.get("t", ""))
        except ActionError as exc:
            return self.error(str(exc), 403)
        exp = int(time.time() + self.service.login_lifetime)
        exp36 = base36(exp)
        value = f"{_b64(user)}.{exp36}.{self.service.signer.mac('session', user, exp36)}"
        resp = web.HTTPSeeOther("/q/list")
        self._cookie(resp, SESSION_COOKIE, value, max_age=int(self.service.login_lifetime))
        raise resp

    async def list_page(self, request, message: str = "", status: int = 200):
        s = self._session(request)
        if s is None:
            return self.error("Please open the link from your latest quarantine digest to sign "
                              "in (sign-in links expire).", 403)
        user, raw = s
        entries = await self.service.qstore.entries_for(user)
        prefs = await self.service.qstore.prefs(user)
        return self.page(
            "page_list.html.j2", status=status, user=user, message=message,
            entries=[e.to_dict() for e in entries], csrf=self.service.signer.mac("csrf-list", raw),
            frequency=prefs.get("frequency") or self.service.options["digest"]["frequency"],
            frequencies=FREQUENCIES,
            allow=sorted(await self.service.qstore.list_get("allow", user)),
            block=sorted(await self.service.qstore.list_get("block", user)))

    async def _list_form(self, request):
        s = self._session(request)
        form = await request.post()
        if s is None:
            return None, None, self.error("Your session expired: open the link from your "
                                          "latest quarantine digest again.", 403)
        if not self._same_origin(request) or not self.service.signer.check_mac(
                str(form.get("csrf", "")), "csrf-list", s[1]):
            return None, None, self.error("This form did not come from this site.", 403)
        return s[0], form, None

    async def list_act(self, request):
        user, form, err = await self._list_form(request)
        if err is not None:
            return err
        action = str(form.get("action", ""))
        entry = await self.service.qstore.get(str(form.get("entry", "")))
        if action not in ACTION_TITLES:
            return self.error("unknown action", 400)
        if entry is None or entry.recipient != user:  # another user's entry: same answer
            return await self.list_page(request, "That message is not in your quarantine.", 404)
        try:
            text = await self.service.perform(entry, action, by=f"web session of {user}")
        except ActionError as exc:
            return await self.list_page(request, str(exc), 409)
        return await self.list_page(request, text)

    async def prefs(self, request):
        user, form, err = await self._list_form(request)
        if err is not None:
            return err
        freq = str(form.get("frequency", ""))
        if freq not in FREQUENCIES:
            return self.error("unknown frequency", 400)
        prefs = await self.service.qstore.prefs(user)
        prefs["frequency"] = freq
        await self.service.qstore.set_prefs(user, prefs)
        return await self.list_page(request, f"Digest frequency set to {freq}.")

    async def health(self, request):
        return web.Response(text="ok\n")

    # -- mailing lists: RFC 8058 one-click unsubscribe ----------------------------------------
    async def list_unsubscribe_page(self, request):
        """GET never acts (link scanners): it shows one button that POSTs to the same URL."""
        q = request.rel_url.query
        listaddr, member = q.get("list", ""), q.get("member", "")
        from html import escape

        body = (f"<!doctype html><html lang=en><meta charset=utf-8><title>Unsubscribe</title>"
                f"<main><h1>Unsubscribe {escape(member)} from {escape(listaddr)}?</h1>"
                f"<form method=post><input type=hidden name=List-Unsubscribe value=One-Click>"
                f"<button>Unsubscribe</button></form></main></html>")
        return web.Response(text=body, content_type="text/html", charset="utf-8")

    async def list_unsubscribe(self, request):
        """The POST a mail client sends for ``List-Unsubscribe-Post: List-Unsubscribe=One-Click``
        (RFC 8058): the signed token in the URL, bound to list and member, is the authority."""
        from ..lists import ListManager

        q = request.rel_url.query
        form = await request.post()
        if form.get("List-Unsubscribe") != "One-Click":
            return web.Response(text="expected List-Unsubscribe=One-Click\n", status=400)
        manager = ListManager(self.service.services.store)
        ok = await manager.one_click_unsubscribe(q.get("list", ""), q.get("member", ""),
                                                 q.get("token", ""))
        if not ok:
            return web.Response(text="unknown list, member or token\n", status=403)
        log.info("list %s: %s unsubscribed by one-click", q.get("list"), q.get("member"))
        return web.Response(text="unsubscribed\n")


def base36(n: int) -> str:
    from ..quarantine.tokens import _b36

    return _b36(n)
