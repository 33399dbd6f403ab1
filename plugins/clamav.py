"""ClamAV: scans every message with a real clamd over its INSTREAM protocol (unix socket or TCP),
reports the virus name as the CLAMAV_VIRUS symbol and applies the configured action (reject,
quarantine, strip the infected parts, or only tag). clamd unreachable or erroring tempfails the
message by default: an unscanned message never passes silently.

The client is a small asyncio-streams implementation of clamd's documented INSTREAM command
(``zINSTREAM``, 4-byte big-endian length-prefixed chunks, a zero-length chunk to finish, one
NUL-terminated reply). It never blocks the event loop, needs no thread, and lets us tell the
"INSTREAM size limit exceeded" reply apart from other errors.
"""
from __future__ import annotations

import asyncio
import email
import email.policy
import io
import logging
import re
import struct
from email.generator import BytesGenerator
from email.message import Message as _EmailMessage

from filterd.config import parse_duration, parse_size
from filterd.hookspecs import hookimpl
from filterd.verdict import Modification, Verdict

log = logging.getLogger("filterd.plugins.clamav")

CONFIG = """
# Where clamd listens: a unix socket path (Debian's system clamd: "/run/clamav/clamd.ctl") or
# "host:port" for TCP ("127.0.0.1:3310", "[::1]:3310"). "" = no virus scanning (the plugin does
# nothing; nothing is claimed to be scanned).
socket = ""
# Time to connect to clamd, and to send a message and get the verdict back.
connect_timeout = "5s"
scan_timeout = "50s"
# The plugin host's limit for one hook call (must exceed scan_timeout).
timeout = "60s"
# clamd's StreamMaxLength: larger data is refused by clamd. Set it to what clamd.conf says, or
# name clamd's config file in clamd_conf and the value is read from there at start-up.
stream_max_length = "25MB"
clamd_conf = ""
# What a virus does: reject the message, quarantine it, strip the infected parts and put a
# notice in their place (falls back to reject when the virus cannot be pinned to a part), or
# only tag it with the CLAMAV_VIRUS symbol and let the score decide.
action = "reject"  # one of: reject, quarantine, strip, tag
# SMTP reply text for a rejected virus; {virus} is the name clamd reported.
reject_message = "Message contains a virus ({virus})"
# Text put in place of a stripped part; {virus} and {filename} are filled in.
strip_notice = "This attachment ({filename}) was removed by the mail gateway: it contained the \
virus {virus}."
# A message larger than stream_max_length: CLAMAV_OVERSIZE is always added, then
# "scan_parts" scans each decoded MIME part that fits (parts that do not fit stay unscanned),
# "accept" lets it pass unscanned, "tempfail"/"reject" refuse it.
oversize = "scan_parts"  # one of: scan_parts, accept, tempfail, reject
# clamd unreachable, timing out or answering ERROR: "tempfail" (default: the message is retried
# later, never passed unscanned) or "accept" with the CLAMAV_FAIL symbol.
unavailable = "tempfail"  # one of: tempfail, accept
# At most this many parts are scanned one by one (for strip, scan_parts, rescan_archives).
max_part_scans = 100
# When the message is clean, scan each archive attachment (zip, 7z, rar, gz, bz2, xz, cab, arj,
# tar, OLE) once more on its own: in a message, the MIME levels count against clamd's
# MaxRecursion, and deeply nested archives escape it. Costs a second scan of archives only.
rescan_archives = true
"""

CHUNK = 64 * 1024
ARCHIVE_MAGIC = (b"PK\x03\x04", b"7z\xbc\xaf\x27\x1c", b"Rar!", b"\x1f\x8b", b"BZh",
                 b"\xfd7zXZ\x00", b"MSCF", b"\x60\xea", b"\xd0\xcf\x11\xe0")


class ClamdError(Exception):
    """clamd could not be reached or did not give a verdict."""


class ClamdSizeLimit(ClamdError):
    """clamd refused the stream: larger than its StreamMaxLength."""


def parse_address(address: str) -> tuple[str, str | int]:
    """("unix", path) or (host, port) from a ``clamav.socket`` setting."""
    a = address.strip()
    if a.startswith("unix:"):
        return "unix", a[5:]
    if a.startswith("tcp:"):
        a = a[4:].lstrip("/")
    if "/" in a or ":" not in a:
        return "unix", a
    host, _, port = a.rpartition(":")
    host = host.strip("[]")
    try:
        return host, int(port)
    except ValueError:
        raise ValueError(f"clamav.socket {address!r}: expected a unix socket path or host:port")


class ClamdClient:
    """One connection per command, as clamd's z-commands expect."""

    def __init__(self, address: str, connect_timeout: float = 5.0, timeout: float = 50.0):
        self.address = address
        self.target = parse_address(address)
        self.connect_timeout = connect_timeout
        self.timeout = timeout

    async def _open(self):
        host, port = self.target
        try:
            if host == "unix":
                coro = asyncio.open_unix_connection(port)
            else:
                coro = asyncio.open_connection(host, port)
            return await asyncio.wait_for(coro, self.connect_timeout)
        except asyncio.TimeoutError:
            raise ClamdError(f"clamd at {self.address}: connect timed out after "
                             f"{self.connect_timeout:g}s") from None
        except OSError as exc:
            raise ClamdError(f"clamd at {self.address}: cannot connect: "
                             f"{exc.strerror or exc}") from None

    @staticmethod
    async def _reply(reader) -> str:
        data = await reader.readuntil(b"\0")
        return data.rstrip(b"\0").decode("utf-8", "replace").strip()

    async def command(self, cmd: str) -> str:
        reader, writer = await self._open()
        try:
            writer.write(b"z" + cmd.encode() + b"\0")
            await writer.drain()
            return await asyncio.wait_for(self._reply(reader), self.timeout)
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError) as exc:
            raise ClamdError(f"clamd at {self.address}: {cmd} failed: {exc!r}") from None
        finally:
            writer.close()

    async def ping(self) -> bool:
        return (await self.command("PING")) == "PONG"

    async def instream(self, data: bytes) -> str | None:
        """Scan ``data``; returns the virus name, or None when clean. Raises ClamdSizeLimit
        when clamd refuses the size, ClamdError for every other failure."""
        try:
            return await asyncio.wait_for(self._instream(data), self.timeout)
        except asyncio.TimeoutError:
            raise ClamdError(f"clamd at {self.address}: no verdict within "
                             f"{self.timeout:g}s") from None

    async def _instream(self, data: bytes) -> str | None:
        reader, writer = await self._open()
        # read the reply while sending: on a size limit clamd answers and closes early, and a
        # reply read only after a failed write would be lost to the connection reset
        reply_task = asyncio.ensure_future(self._reply(reader))
        try:
            try:
                writer.write(b"zINSTREAM\0")
                view = memoryview(data)
                for i in range(0, len(view), CHUNK):
                    if reply_task.done():
                        break
                    chunk = view[i:i + CHUNK]
                    writer.write(struct.pack(">I", len(chunk)))
                    writer.write(chunk)
                    await writer.drain()
                else:
                    writer.write(struct.pack(">I", 0))
                    await writer.drain()
            except OSError:
                pass  # clamd closed early: its reply (if any) says why
            try:
                reply = await reply_task
            except asyncio.IncompleteReadError as exc:
                reply = exc.partial.rstrip(b"\0").decode("utf-8", "replace").strip()
                if not reply:
                    raise ClamdError(f"clamd at {self.address}: connection closed before a "
                                     f"verdict") from None
            except OSError as exc:
                raise ClamdError(f"clamd at {self.address}: connection lost before a "
                                 f"verdict ({exc.__class__.__name__})") from None
        finally:
            if not reply_task.done():
                reply_task.cancel()
            writer.close()
        # "stream: OK", "stream: Eicar-Signature FOUND", "INSTREAM size limit exceeded. ERROR"
        if "size limit exceeded" in reply:
            raise ClamdSizeLimit(f"clamd at {self.address}: {reply}")
        if reply.endswith("FOUND"):
            return reply.partition(":")[2].rsplit(" ", 1)[0].strip() or "unknown"
        if reply.endswith("OK"):
            return None
        raise ClamdError(f"clamd at {self.address}: unexpected reply {reply!r}")


def keep_own_verdict(ctx, verdict: Verdict | None) -> dict | None:
    """{address: verdict} for recipients whose outcome is not more severe than ``verdict``."""
    if verdict is None:
        return None
    return {r.address: verdict for r in ctx.recipients
            if r.verdict.action.severity <= verdict.action.severity}


def stream_max_from_conf(path: str) -> int | None:
    """StreamMaxLength from a clamd.conf, or None when not set there."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            m = re.match(r"^\s*StreamMaxLength\s+(\S+)", line)
            if m:
                return parse_size(m.group(1))
    return None


# ---------------------------------------------------------------------------------------------
# Walking MIME leaves of a message (for per-part scans and stripping)
# ---------------------------------------------------------------------------------------------
def leaves(msg: _EmailMessage, limit: int = 1000, max_depth: int = 30):
    """(node, payload bytes, filename) of each leaf, iteratively, bounded."""
    out = []
    stack = [(msg, 0)]
    while stack and len(out) < limit:
        node, depth = stack.pop()
        if depth > max_depth:
            continue
        if node.is_multipart():
            payload = node.get_payload()
            if isinstance(payload, list):
                stack.extend((c, depth + 1) for c in reversed(payload)
                             if isinstance(c, _EmailMessage))
            continue
        try:
            data = node.get_payload(decode=True)
        except Exception:  # noqa: BLE001 - hostile encodings
            data = None
        if data is None:
            raw = node.get_payload()
            data = raw.encode("utf-8", "surrogateescape") if isinstance(raw, str) else b""
        try:
            filename = node.get_filename() or ""
        except Exception:  # noqa: BLE001
            filename = ""
        out.append((node, data, str(filename)))
    return out


def _replace_with_notice(node: _EmailMessage, text: str) -> None:
    for h in ("Content-Type", "Content-Transfer-Encoding", "Content-Disposition",
              "Content-Description", "Content-ID"):
        del node[h]
    node["Content-Type"] = 'text/plain; charset="utf-8"'
    node["Content-Transfer-Encoding"] = "8bit"
    node["Content-Disposition"] = "inline"
    node.set_payload(text.encode("utf-8").decode("utf-8", "surrogateescape"))


def _body_bytes(msg: _EmailMessage) -> bytes:
    buf = io.BytesIO()
    BytesGenerator(buf, mangle_from_=False, policy=email.policy.compat32).flatten(msg)
    raw = buf.getvalue()
    for sep in (b"\r\n\r\n", b"\n\n"):
        i = raw.find(sep)
        if i >= 0:
            return raw[i + len(sep):]
    return b""


class Plugin:
    """Virus scanning with clamd (INSTREAM over unix socket or TCP)."""

    def __init__(self, options, services):
        self.options = options
        self.client: ClamdClient | None = None
        self.max_len = parse_size(options.get("stream_max_length") or "25MB")

    @hookimpl
    def startup(self, options, services):
        addr = (options.get("socket") or "").strip()
        if options.get("clamd_conf"):
            path = options["clamd_conf"]
            try:
                found = stream_max_from_conf(path)
            except OSError as exc:
                raise RuntimeError(f"[clamav] clamd_conf {path}: cannot read: "
                                   f"{exc.strerror}") from None
            if found:
                self.max_len = found
        if addr:
            self.client = ClamdClient(addr, parse_duration(options["connect_timeout"]),
                                      parse_duration(options["scan_timeout"]))

    # -- helpers --------------------------------------------------------------------------------
    def _fail(self, ctx, exc: Exception):
        ctx.add_symbol("CLAMAV_FAIL", 0.0, [str(exc)[:200]], "message not scanned: clamd failed",
                       source="clamav")
        log.error("virus scan of %s failed: %s", ctx.transaction.id, exc)
        if self.options.get("unavailable", "tempfail") == "accept":
            return None
        return Verdict.tempfail("Virus scanner temporarily unavailable; please try again later",
                                code=451, enhanced="4.7.1", source="clamav")

    async def _scan_parts(self, ctx, message) -> tuple[list, list, list]:
        """Scan each leaf part on its own: ([(node, virus, filename)], oversize names,
        the parsed copy whose nodes those are)."""
        msg = email.message_from_bytes(message.raw, policy=email.policy.compat32)
        infected, oversize = [], []
        limit = int(self.options.get("max_part_scans", 100))
        for i, (node, data, filename) in enumerate(leaves(msg)):
            if i >= limit:
                oversize.append(f"more than {limit} parts")
                break
            if len(data) > self.max_len:
                oversize.append(filename or node.get_content_type())
                continue
            if not data:
                continue
            virus = await self.client.instream(data)
            if virus:
                infected.append((node, virus, filename))
        return infected, oversize, msg

    async def _rescan_archives(self, message) -> str | None:
        """Scan archive attachments again on their own. Inside a message each MIME level and
        the transfer decoding count against clamd's MaxRecursion, so a deeply nested archive
        (clamav-testfiles' clam_cache_emax.tgz) is found alone but missed in the message."""
        limit = int(self.options.get("max_part_scans", 100))
        for part in message.parsed.parts[:limit]:
            data = part.payload
            if len(data) > self.max_len or not data.startswith(ARCHIVE_MAGIC) and \
                    data[257:262] != b"ustar":
                continue
            virus = await self.client.instream(data)
            if virus:
                return virus
        return None

    # -- the scan -------------------------------------------------------------------------------
    def idle_hooks(self) -> set[str]:
        return {"data", "decide"} if self.client is None else set()  # no clamd configured

    @hookimpl
    async def data(self, ctx, message):
        if self.client is None:
            return None
        verdict = await self._scan(ctx, message)
        if verdict is not None:
            ctx.data["clamav.verdict"] = verdict
        return verdict

    @hookimpl
    def decide(self, ctx):
        """Keep our verdict's own reply (virus name, scanner down) when the score reached the
        same action: at equal severity the score's generic "spam" reply would win otherwise."""
        return keep_own_verdict(ctx, ctx.data.get("clamav.verdict"))

    async def _scan(self, ctx, message):
        opts = self.options
        virus = None
        try:
            if message.size <= self.max_len:
                try:
                    virus = await self.client.instream(message.raw)
                    oversized = False
                except ClamdSizeLimit:
                    oversized = True
                if not oversized and not virus and opts.get("rescan_archives", True):
                    virus = await self._rescan_archives(message)
            else:
                oversized = True
            if oversized:
                ctx.add_symbol("CLAMAV_OVERSIZE", None,
                               [f"{message.size} bytes > {self.max_len}"],
                               "message larger than clamd's StreamMaxLength", source="clamav")
                policy = opts.get("oversize", "scan_parts")
                if policy == "accept":
                    return None
                if policy == "tempfail":
                    return Verdict.tempfail("Message too large to scan for viruses now",
                                            code=452, enhanced="4.3.4", source="clamav")
                if policy == "reject":
                    return Verdict.reject("Message too large to be scanned for viruses",
                                          code=552, enhanced="5.3.4", source="clamav")
                infected, unscanned, _ = await self._scan_parts(ctx, message)
                if unscanned:
                    ctx.add_symbol("CLAMAV_OVERSIZE", None, [f"unscanned: {n}" for n in unscanned])
                if not infected:
                    return None
                virus = infected[0][1]
        except ClamdError as exc:
            return self._fail(ctx, exc)
        if not virus:
            return None
        action = opts.get("action", "reject")
        sym = ctx.add_symbol("CLAMAV_VIRUS", None, [virus], "clamd found a virus",
                             source="clamav")
        if action != "tag":
            # the configured action decides; the weight would only turn quarantine/strip into
            # a score reject. With action = "tag" the weight ([scores] CLAMAV_VIRUS) decides.
            sym.score = 0.0
        reason = (opts.get("reject_message") or "Message contains a virus ({virus})").replace(
            "{virus}", virus)
        if action == "tag":
            return None
        if action == "quarantine":
            return Verdict.quarantine(reason, source="clamav")
        if action == "strip":
            try:
                mods = await self._strip(ctx, message)
            except ClamdError as exc:
                return self._fail(ctx, exc)
            if mods:
                ctx.modifications.extend(mods)
                return None
            log.warning("virus %s in %s not found in any single part; rejecting instead of "
                        "stripping", virus, ctx.transaction.id)
        return Verdict.reject(reason, code=554, enhanced="5.7.0", source="clamav")

    async def _strip(self, ctx, message) -> list[Modification]:
        infected, _, msg = await self._scan_parts(ctx, message)
        if not infected:
            return []
        template = self.options.get("strip_notice") or "Attachment removed: {virus}"
        names = []
        mods: list[Modification] = []
        for node, virus, filename in infected:
            names.append(f"{filename or node.get_content_type()}={virus}")
            notice = template.replace("{virus}", virus).replace(
                "{filename}", filename or "unnamed") + "\n"
            if node is msg:  # the whole body is the infected part
                mods += [Modification.change_header("Content-Type", 'text/plain; charset="utf-8"'),
                         Modification.change_header("Content-Transfer-Encoding", "8bit"),
                         Modification.remove_header("Content-Disposition")]
                return mods + [Modification.replace_body(notice.encode()),
                               Modification.add_header("X-Virus-Stripped", "; ".join(names))]
            _replace_with_notice(node, notice)
        ctx.add_symbol("CLAMAV_STRIPPED", None, names, "infected parts removed", source="clamav")
        return [Modification.replace_body(_body_bytes(msg)),
                Modification.add_header("X-Virus-Stripped", "; ".join(names))]

