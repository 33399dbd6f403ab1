"""Attachment policy: banned file extensions and MIME types (executables and scripts by default),
double extensions, file types detected from content (magic bytes) that beat a lying
Content-Type, names inside zip/tar/7z/rar archives (nested up to a depth limit), encrypted
archives, Office documents with macros, and protection against zip bombs, deeply nested MIME,
malformed base64 and messages with thousands of parts. Findings are symbols; banned files also
get the configured action. Every walk is bounded in items, bytes and depth, and runs in a worker
thread so a hostile message cannot stall the event loop.
"""
from __future__ import annotations

import asyncio
import binascii
import io
import logging
import re
import tarfile
import time
import zipfile
from dataclasses import dataclass, field

from filterd_plugins.clamav import keep_own_verdict

from filterd.config import parse_duration, parse_size
from filterd.hookspecs import hookimpl
from filterd.verdict import Verdict

log = logging.getLogger("filterd.plugins.attachments")

try:  # optional: 7z listing (pure Python)
    import py7zr
except Exception:  # noqa: BLE001
    py7zr = None
try:  # optional: rar listing (headers only; no unrar tool needed for names)
    import rarfile
except Exception:  # noqa: BLE001
    rarfile = None
_VBA_PARSER = []


def vba_parser():
    """oletools' VBA_Parser, imported on first use (it is slow to import); None if missing."""
    if not _VBA_PARSER:
        try:
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                from oletools.olevba import VBA_Parser
        except Exception:  # noqa: BLE001
            VBA_Parser = None
        _VBA_PARSER.append(VBA_Parser)
    return _VBA_PARSER[0]

CONFIG = """
# File name extensions refused wherever they appear: as an attachment, or inside an archive.
banned_extensions = ["exe", "scr", "pif", "com", "bat", "cmd", "vbs", "vbe", "js", "jse", "wsf", \
"wsh", "wsc", "hta", "cpl", "msi", "msp", "mst", "msc", "jar", "ps1", "psm1", "psd1", "lnk", \
"reg", "dll", "scf", "inf", "sct", "shs", "chm", "gadget", "application", "appx", "msix", "iso", \
"img", "vhd", "vhdx", "xll", "ws", "cab"]
# MIME types refused, as declared by the sender or as detected from the content.
banned_mime_types = ["application/x-msdownload", "application/x-dosexec", \
"application/x-ms-dos-executable", "application/vnd.microsoft.portable-executable", \
"application/x-executable", "application/x-mach-binary", "application/x-msi", \
"application/x-ms-installer", "application/x-ms-shortcut", "application/hta", "application/x-bat", \
"application/x-javascript", "text/javascript", "application/javascript", "application/x-sh", \
"text/x-shellscript"]
# Extensions that make "name.pdf.exe" a double extension when followed by a banned one.
decoy_extensions = ["pdf", "doc", "docx", "xls", "xlsx", "ppt", "pptx", "txt", "rtf", "jpg", \
"jpeg", "png", "gif", "bmp", "zip", "rar", "htm", "html", "mp3", "mp4", "avi", "csv", "odt", "xml"]
# What a banned attachment (extension, type, double extension, disguised executable, banned name
# inside an archive) does: reject or quarantine the message, or only score its symbol.
banned_action = "reject"  # one of: reject, quarantine, score
reject_message = "Attachment not allowed: {what}"
# Archives: look inside zip (always), tar, gz, bz2, xz (stdlib), 7z (py7zr) and rar (rarfile).
look_inside_archives = true
# Archives inside archives are opened down to this depth; deeper ones get ARCHIVE_TOO_DEEP.
archive_depth = 3
# At most this many archive members are looked at per message.
max_archive_members = 2000
# Zip bomb limits: total uncompressed size of one archive, and the compression ratio of a
# member (checked for members above ratio_min_size).
max_uncompressed = "200MB"
max_ratio = 200
ratio_min_size = "1MB"
# A nested archive is unpacked into memory (to look inside it) only up to this size.
max_nested_size = "20MB"
# MIME structure limits: nesting depth and number of parts before a symbol.
max_mime_depth = 20
max_parts = 500
# Time budget for one message; past it the rest is skipped with ATTACH_SCAN_LIMIT.
time_budget = "5s"
"""

# detected type, by magic bytes at offset 0 (first match wins)
_MAGIC = [
    (b"MZ", "application/x-dosexec"),
    (b"\x7fELF", "application/x-executable"),
    (b"\xcf\xfa\xed\xfe", "application/x-mach-binary"),
    (b"\xce\xfa\xed\xfe", "application/x-mach-binary"),
    (b"\xfe\xed\xfa\xce", "application/x-mach-binary"),
    (b"\xfe\xed\xfa\xcf", "application/x-mach-binary"),
    (b"L\x00\x00\x00\x01\x14\x02\x00", "application/x-ms-shortcut"),
    (b"PK\x03\x04", "application/zip"),
    (b"PK\x05\x06", "application/zip"),
    (b"7z\xbc\xaf\x27\x1c", "application/x-7z-compressed"),
    (b"Rar!\x1a\x07", "application/vnd.rar"),
    (b"\x1f\x8b", "application/gzip"),
    (b"BZh", "application/x-bzip2"),
    (b"\xfd7zXZ\x00", "application/x-xz"),
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "application/x-ole-storage"),
    (b"MSCF", "application/vnd.ms-cab-compressed"),
    (b"%PDF-", "application/pdf"),
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"{\\rtf", "application/rtf"),
    (b"#!", "text/x-shellscript"),
]
EXECUTABLE_TYPES = {"application/x-dosexec", "application/x-executable",
                    "application/x-mach-binary", "application/x-ms-shortcut"}
ARCHIVE_TYPES = {"application/zip", "application/x-7z-compressed", "application/vnd.rar",
                 "application/gzip", "application/x-bzip2", "application/x-xz",
                 "application/x-tar"}
ARCHIVE_EXTS = {"zip": "application/zip", "7z": "application/x-7z-compressed",
                "rar": "application/vnd.rar", "tar": "application/x-tar",
                "gz": "application/gzip", "tgz": "application/gzip", "bz2": "application/x-bzip2",
                "xz": "application/x-xz", "jar": "application/zip"}
OFFICE_EXTS = {"doc", "docm", "docx", "dot", "dotm", "xls", "xlsm", "xlsx", "xlsb", "xlt",
               "xltm", "ppt", "pptm", "pptx", "pps", "ppsm", "potm"}
# declared types a detected type may legitimately arrive as (besides generic ones)
_COMPATIBLE = {
    "application/zip": ("application/zip", "application/x-zip", "application/x-zip-compressed",
                        "application/vnd.openxmlformats", "application/vnd.oasis",
                        "application/vnd.ms-", "application/java-archive",
                        "application/vnd.android", "application/epub", "application/x-jar"),
    "application/x-ole-storage": ("application/msword", "application/vnd.ms-",
                                  "application/x-msi", "application/x-ole-storage",
                                  "application/vnd.visio", "application/x-msword"),
    "application/pdf": ("application/pdf", "application/x-pdf"),
    "image/png": ("image/",), "image/jpeg": ("image/",), "image/gif": ("image/",),
    "application/rtf": ("application/rtf", "text/rtf", "application/msword"),
    "application/gzip": ("application/gzip", "application/x-gzip", "application/x-tar",
                         "application/x-compressed", "application/x-gtar"),
}
_GENERIC = ("application/octet-stream", "application/x-download", "application/force-download",
            "application/download", "application/unknown", "binary/octet-stream",
            "application/binary", "")
_B64_OK = re.compile(rb"^[A-Za-z0-9+/]*={0,2}$")
_WS = re.compile(rb"\s+")


def detect_type(data: bytes) -> str:
    """MIME type from the content's magic bytes; "" when not recognised."""
    head = data[:16]
    for magic, mtype in _MAGIC:
        if head.startswith(magic):
            if mtype == "application/x-dosexec" and len(data) < 64:
                return ""  # "MZ" alone starts plenty of text
            return mtype
    if len(data) > 262 and data[257:262] == b"ustar":
        return "application/x-tar"
    return ""


def extensions(name: str) -> list[str]:
    """Lower-case extensions of a file name, Windows-normalised: trailing dots and spaces are
    dropped, whitespace before a dot is ignored ("a.pdf   .exe" -> ["pdf", "exe"])."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1].strip().rstrip(". ").lower()
    pieces = [p.strip() for p in base.split(".")]
    return [p for p in pieces[1:] if p]


@dataclass
class Findings:
    symbols: dict[str, list[str]] = field(default_factory=dict)
    banned: list[str] = field(default_factory=list)

    def add(self, name: str, option: str = "") -> None:
        opts = self.symbols.setdefault(name, [])
        if option and option not in opts and len(opts) < 20:
            opts.append(option[:200])


class Budget:
    def __init__(self, seconds: float, members: int, unpack_bytes: int):
        self.deadline = time.monotonic() + seconds
        self.members = members
        self.unpack_bytes = unpack_bytes  # bytes of nested archives unpacked, whole message

    def out_of_time(self) -> bool:
        return time.monotonic() > self.deadline


class Scanner:
    """The analysis, synchronous and bounded (runs in a worker thread)."""

    def __init__(self, options: dict):
        o = options
        self.banned_ext = {e.lower().lstrip(".") for e in o["banned_extensions"]}
        self.banned_types = {t.lower() for t in o["banned_mime_types"]}
        self.decoys = {e.lower().lstrip(".") for e in o["decoy_extensions"]}
        self.look_inside = bool(o["look_inside_archives"])
        self.depth_limit = int(o["archive_depth"])
        self.max_members = int(o["max_archive_members"])
        self.max_uncompressed = parse_size(o["max_uncompressed"])
        self.max_ratio = float(o["max_ratio"])
        self.ratio_min = parse_size(o["ratio_min_size"])
        self.max_nested = parse_size(o["max_nested_size"])
        self.max_mime_depth = int(o["max_mime_depth"])
        self.max_parts = int(o["max_parts"])
        self.time_budget = parse_duration(o["time_budget"])

    # -- file names -----------------------------------------------------------------------------
    def check_name(self, f: Findings, name: str, where: str = "") -> None:
        if not name:
            return
        label = f"{where}{name}"
        if "\u202e" in name or "\u202d" in name:
            f.add("ATTACH_RTLO", label)
        exts = extensions(name.replace("\u202e", "").replace("\u202d", ""))
        if not exts:
            return
        if exts[-1] in self.banned_ext:
            if where:
                f.add("ARCHIVE_BANNED_NAME", label)
            else:
                f.add("ATTACH_BANNED_EXT", label)
            f.banned.append(label)
            if len(exts) >= 2 and exts[-2] in self.decoys:
                f.add("ATTACH_DOUBLE_EXT", label)

    # -- the whole message ----------------------------------------------------------------------
    def scan(self, message) -> Findings:
        f = Findings()
        budget = Budget(self.time_budget, self.max_members, self.max_uncompressed)
        parsed = message.parsed
        if any(str(d).startswith("unparseable message") for d in parsed.defects):
            # the stdlib parser recurses per MIME level: only absurd nesting makes it give up
            f.add("MIME_UNPARSEABLE", "MIME structure could not be parsed")
            f.add("MIME_DEEP_NESTING", "parser recursion limit")
        self.check_structure(f, parsed.email)
        for part in parsed.parts[: self.max_parts]:
            if budget.out_of_time():
                f.add("ATTACH_SCAN_LIMIT", "time budget spent")
                break
            self.check_part(f, part, budget)
        return f

    def check_structure(self, f: Findings, root) -> None:
        count, deepest = 0, 0
        stack = [(root, 0)]
        while stack:
            node, depth = stack.pop()
            count += 1
            deepest = max(deepest, depth)
            if count > self.max_parts:
                f.add("MIME_TOO_MANY_PARTS", f"more than {self.max_parts} parts")
                break
            if depth > self.max_mime_depth:
                f.add("MIME_DEEP_NESTING", f"deeper than {self.max_mime_depth} levels")
                continue
            payload = node.get_payload()
            if node.is_multipart() and isinstance(payload, list):
                stack.extend((c, depth + 1) for c in payload if hasattr(c, "is_multipart"))
            elif isinstance(payload, str) and \
                    str(node.get("Content-Transfer-Encoding", "")).strip().lower() == "base64":
                if not self.base64_ok(payload):
                    try:
                        name = node.get_filename() or node.get_content_type()
                    except Exception:  # noqa: BLE001
                        name = "part"
                    f.add("MIME_BAD_BASE64", str(name))

    @staticmethod
    def base64_ok(text: str) -> bool:
        data = _WS.sub(b"", text.encode("ascii", "replace"))
        if not data:
            return True
        if len(data) % 4 or not _B64_OK.match(data):
            return False
        try:
            binascii.a2b_base64(data, strict_mode=True)
        except (binascii.Error, ValueError):
            return False
        return True

    # -- one MIME leaf --------------------------------------------------------------------------
    def check_part(self, f: Findings, part, budget: Budget) -> None:
        name = part.filename or ""
        declared = (part.content_type or "").lower()
        data = part.payload
        if not part.is_attachment and data[:2] not in (b"MZ", b"\x7fE", b"PK"):
            return  # ordinary text body
        self.check_name(f, name)
        label = name or f"part {part.path}"
        detected = detect_type(data)
        if declared in self.banned_types:
            f.add("ATTACH_BANNED_TYPE", f"{label}: {declared}")
            f.banned.append(f"{label} ({declared})")
        # by content, only binary executables are banned: "#!" also starts harmless scripts
        if detected in EXECUTABLE_TYPES:
            f.add("ATTACH_BANNED_TYPE", f"{label}: {detected} (by content)")
            f.banned.append(f"{label} ({detected} by content)")
        if detected and self.mismatch(declared, detected, name):
            f.add("ATTACH_TYPE_MISMATCH", f"{label}: declared {declared or 'nothing'}, "
                                          f"content is {detected}")
        exts = extensions(name)
        ext = exts[-1] if exts else ""
        if ext in OFFICE_EXTS or detected == "application/x-ole-storage":
            self.check_macros(f, label, data)
        kind = detected if detected in ARCHIVE_TYPES else ""
        if not kind and ext in ARCHIVE_EXTS and detected == "":
            kind = ARCHIVE_EXTS[ext]
        if kind and self.look_inside:
            self.check_archive(f, label, data, kind, 1, budget, name)

    def mismatch(self, declared: str, detected: str, name: str) -> bool:
        if detected in EXECUTABLE_TYPES:
            return declared not in self.banned_types and not \
                (extensions(name) and extensions(name)[-1] in self.banned_ext)
        if declared in _GENERIC or declared.startswith(("multipart/", "message/")):
            return False
        ok = _COMPATIBLE.get(detected)
        if ok is None:
            return False
        return not declared.startswith(ok)

    def check_macros(self, f: Findings, label: str, data: bytes) -> None:
        if data[:4] == b"PK\x03\x04":
            try:  # OOXML: macros live in a vbaProject.bin member
                with zipfile.ZipFile(io.BytesIO(data)) as z:
                    if any(n.lower().endswith("vbaproject.bin") for n in z.namelist()[:5000]):
                        f.add("OFFICE_MACROS", label)
                        return
            except (zipfile.BadZipFile, OSError, ValueError, NotImplementedError):
                pass
        parser = vba_parser()
        if parser is None or len(data) > self.max_nested:
            return
        try:
            vba = parser(label, data=data)
            try:
                if vba.detect_vba_macros():
                    f.add("OFFICE_MACROS", label)
            finally:
                vba.close()
        except Exception:  # noqa: BLE001 - oletools raises many types on hostile files
            log.debug("oletools could not read %s", label, exc_info=True)

    # -- archives -------------------------------------------------------------------------------
    def check_archive(self, f: Findings, label: str, data: bytes, kind: str, depth: int,
                      budget: Budget, name: str = "") -> None:
        if depth > self.depth_limit:
            f.add("ARCHIVE_TOO_DEEP", f"{label} (more than {self.depth_limit} levels)")
            return
        try:
            if kind == "application/zip":
                self._zip(f, label, data, depth, budget)
            elif kind in ("application/x-tar", "application/gzip", "application/x-bzip2",
                          "application/x-xz"):
                self._tar(f, label, data, kind, depth, budget, name)
            elif kind == "application/x-7z-compressed" and py7zr is not None:
                self._7z(f, label, data, budget)
            elif kind == "application/vnd.rar" and rarfile is not None:
                self._rar(f, label, data, budget)
        except _Bomb as exc:
            f.add("ARCHIVE_BOMB", f"{label}: {exc}")
        except Exception as exc:  # noqa: BLE001 - corrupt archives must not crash the scan
            if _looks_encrypted(exc):
                f.add("ARCHIVE_ENCRYPTED", label)
            else:
                f.add("ARCHIVE_CORRUPT", f"{label}: {type(exc).__name__}")

    def _member(self, f: Findings, label: str, mname: str, size: int, csize: int | None,
                total: int, budget: Budget) -> int:
        budget.members -= 1
        if budget.members < 0:
            f.add("ATTACH_SCAN_LIMIT", f"more than {self.max_members} archive members")
            raise _Stop()
        self.check_name(f, mname, where=f"{label}/")
        total += max(size, 0)
        if total > self.max_uncompressed:
            raise _Bomb(f"unpacks to more than {self.max_uncompressed} bytes")
        if csize is not None and size >= self.ratio_min and size / max(csize, 1) > self.max_ratio:
            raise _Bomb(f"member {mname} compression ratio {size // max(csize, 1)}:1")
        return total

    def _nested(self, f, label, mname, read, size, depth, budget) -> None:
        exts = extensions(mname)
        kind = ARCHIVE_EXTS.get(exts[-1]) if exts else None
        if not kind and not mname.lower().endswith((".docm", ".xlsm", ".pptm", ".doc", ".xls")):
            return
        if size > self.max_nested:
            return
        data = read(self.max_nested + 1)
        if len(data) > self.max_nested:
            raise _Bomb(f"member {mname} larger than its header says")
        budget.unpack_bytes -= len(data)
        if budget.unpack_bytes < 0:
            raise _Bomb(f"nested archives unpack to more than {self.max_uncompressed} bytes")
        detected = detect_type(data)
        if detected in EXECUTABLE_TYPES:
            f.add("ARCHIVE_BANNED_NAME", f"{label}/{mname} ({detected} by content)")
            f.banned.append(f"{label}/{mname}")
        if exts and exts[-1] in OFFICE_EXTS:
            self.check_macros(f, f"{label}/{mname}", data)
            return
        self.check_archive(f, f"{label}/{mname}", data, detected or kind, depth + 1, budget,
                           mname)

    def _zip(self, f: Findings, label: str, data: bytes, depth: int, budget: Budget) -> None:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            infos = z.infolist()
            total = 0
            try:
                for info in infos:
                    if budget.out_of_time():
                        f.add("ATTACH_SCAN_LIMIT", "time budget spent")
                        return
                    total = self._member(f, label, info.filename, info.file_size,
                                         info.compress_size, total, budget)
                    if info.flag_bits & 0x1:
                        f.add("ARCHIVE_ENCRYPTED", label)
                        continue
                    if depth < self.depth_limit + 1 and not info.is_dir():
                        def read(n, info=info):
                            with z.open(info) as fh:
                                return fh.read(n)
                        try:
                            self._nested(f, label, info.filename, read, info.file_size, depth,
                                         budget)
                        except (zipfile.BadZipFile, NotImplementedError, RuntimeError,
                                OSError, EOFError) as exc:
                            f.add("ARCHIVE_CORRUPT", f"{label}/{info.filename}: "
                                                     f"{type(exc).__name__}")
            except _Stop:
                return

    def _tar(self, f, label, data, kind, depth, budget, name) -> None:
        stream = io.BytesIO(data)
        if kind != "application/x-tar":
            # a compressed single file or a compressed tar: peek at the first 512 bytes
            import bz2
            import gzip
            import lzma
            opener = {"application/gzip": gzip.open, "application/x-bzip2": bz2.open,
                      "application/x-xz": lzma.open}[kind]
            with opener(io.BytesIO(data)) as fh:
                head = fh.read(512)
            if not (len(head) >= 262 and head[257:262] == b"ustar"):
                inner = re.sub(r"\.(gz|tgz|bz2|xz)$", "", name or "", flags=re.I)
                if inner and inner != name:
                    self.check_name(f, inner, where=f"{label}/")
                return
        total = 0
        try:
            with tarfile.open(fileobj=stream, mode="r|*") as t:
                for member in t:
                    if budget.out_of_time():
                        f.add("ATTACH_SCAN_LIMIT", "time budget spent")
                        return
                    total = self._member(f, label, member.name, member.size, None, total,
                                         budget)
                    if member.isfile() and depth < self.depth_limit + 1:
                        def read(n, member=member):
                            fh = t.extractfile(member)
                            return fh.read(n) if fh else b""
                        self._nested(f, label, member.name, read, member.size, depth, budget)
        except _Stop:
            return

    def _7z(self, f, label, data, budget) -> None:
        with py7zr.SevenZipFile(io.BytesIO(data), mode="r") as z:
            if z.needs_password():
                f.add("ARCHIVE_ENCRYPTED", label)
            total = 0
            try:
                for info in z.list():
                    size = int(getattr(info, "uncompressed", 0) or 0)
                    total = self._member(f, label, info.filename, size, None, total, budget)
            except _Stop:
                return

    def _rar(self, f, label, data, budget) -> None:
        with rarfile.RarFile(io.BytesIO(data)) as r:
            if r.needs_password():
                f.add("ARCHIVE_ENCRYPTED", label)
            total = 0
            try:
                for info in r.infolist():
                    if info.needs_password():
                        f.add("ARCHIVE_ENCRYPTED", label)
                    total = self._member(f, label, info.filename, info.file_size,
                                         info.compress_size, total, budget)
            except _Stop:
                return


class _Bomb(Exception):
    pass


class _Stop(Exception):
    pass


def _looks_encrypted(exc: Exception) -> bool:
    text = f"{type(exc).__name__} {exc}".lower()
    return "password" in text or "encrypt" in text


class Plugin:
    """Attachment policy: banned names and types, archives, macros, MIME abuse."""

    def __init__(self, options, services):
        self.options = options
        self.scanner = Scanner(options)

    @hookimpl
    async def data(self, ctx, message):
        parts = message.parsed.parts  # parsed once: the view is shared with other plugins
        if any(p.is_attachment for p in parts) or len(parts) > 8:
            # archives and content sniffing can take a while: off the event loop
            findings = await asyncio.to_thread(self.scanner.scan, message)
        else:
            findings = self.scanner.scan(message)  # a few text parts: structure checks only
        action = self.options.get("banned_action", "reject")
        for name, opts in findings.symbols.items():
            sym = ctx.add_symbol(name, None, opts, DESCRIPTIONS.get(name, ""),
                                 source="attachments")
            if name in BANNED_SYMBOLS and action != "score":
                sym.score = 0.0  # the configured action decides, not the weight
        if not findings.banned:
            return None
        what = ", ".join(dict.fromkeys(findings.banned))[:300]
        reason = (self.options.get("reject_message") or "Attachment not allowed: {what}"
                  ).replace("{what}", what)
        verdict = None
        if action == "reject":
            verdict = Verdict.reject(reason, code=554, enhanced="5.7.1", source="attachments")
        elif action == "quarantine":
            verdict = Verdict.quarantine(reason, source="attachments")
        ctx.data["attachments.verdict"] = verdict
        return verdict

    @hookimpl
    def decide(self, ctx):
        """Keep the specific reply ("Attachment not allowed: x.exe") when the score reached the
        same action (at equal severity the generic score reply would win otherwise)."""
        return keep_own_verdict(ctx, ctx.data.get("attachments.verdict"))


# symbols that mean "banned": with banned_action reject/quarantine they carry no weight
BANNED_SYMBOLS = {"ATTACH_BANNED_EXT", "ATTACH_BANNED_TYPE", "ARCHIVE_BANNED_NAME"}

DESCRIPTIONS = {
    "ATTACH_BANNED_EXT": "attachment with a banned file extension",
    "ATTACH_BANNED_TYPE": "attachment of a banned type (declared or detected from content)",
    "ATTACH_DOUBLE_EXT": "decoy double extension (e.g. invoice.pdf.exe)",
    "ATTACH_TYPE_MISMATCH": "content type detected from the bytes differs from the declared one",
    "ATTACH_RTLO": "file name uses a right-to-left override to disguise its extension",
    "ATTACH_SCAN_LIMIT": "attachment analysis stopped at a limit",
    "ARCHIVE_BANNED_NAME": "archive contains a file with a banned extension",
    "ARCHIVE_ENCRYPTED": "encrypted (password-protected) archive",
    "ARCHIVE_TOO_DEEP": "archives nested deeper than the limit",
    "ARCHIVE_BOMB": "archive exceeds the size or compression-ratio limit (zip bomb)",
    "ARCHIVE_CORRUPT": "archive could not be read",
    "OFFICE_MACROS": "Office document contains VBA macros",
    "MIME_DEEP_NESTING": "MIME parts nested deeper than the limit",
    "MIME_TOO_MANY_PARTS": "message has more MIME parts than the limit",
    "MIME_BAD_BASE64": "malformed base64 in a part",
    "MIME_UNPARSEABLE": "MIME structure could not be parsed",
}
