"""Attachment policy end to end through `filterd check`: banned names and types, double
extensions, magic bytes beating a lying Content-Type, archive contents, encrypted archives,
Office macros, zip bombs and MIME abuse (bounded, symbols instead of crashes)."""
from __future__ import annotations

import base64
import gzip
import io
import os
import shutil
import subprocess
import tarfile
import zipfile
from email.message import EmailMessage
from pathlib import Path

import pytest

from conftest import DATA, check_json as _check_json

HERMETIC = DATA / "clamav" / "filterd-test.toml"


def check_json(path_or_bytes, *args: str, env=None):
    """`filterd check --json` with an empty config file: /etc/filterd cannot leak in."""
    return _check_json(path_or_bytes, "--config", str(HERMETIC), *args, env=env)

TESTFILES = Path("/usr/share/clamav-testfiles")
RCPT = ("--rcpt", "bob@example.org", "--from", "alice@example.com")
EXE = b"MZ\x90\x00" + b"\x00" * 60 + b"PE\x00\x00" + b"\x00" * 200


def message(*attachments: tuple[str, bytes, str], subject: str = "files") -> bytes:
    m = EmailMessage()
    m["From"] = "Alice <alice@example.com>"
    m["To"] = "bob@example.org"
    m["Subject"] = subject
    m["Date"] = "Fri, 27 Nov 2026 08:00:00 +0000"
    m["Message-ID"] = "<att-test@example.com>"
    m.set_content("Hello Bob,\n\nfiles attached.\n")
    for name, data, ctype in attachments:
        mt, st = ctype.split("/")
        m.add_attachment(data, maintype=mt, subtype=st, filename=name)
    return m.as_bytes()


def make_zip(members: dict[str, bytes], encrypt_flag: bool = False) -> bytes:
    b = io.BytesIO()
    with zipfile.ZipFile(b, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            info = zipfile.ZipInfo(name)
            info.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(info, data)
    raw = b.getvalue()
    if encrypt_flag:  # set the "encrypted" general-purpose bit in local and central headers
        raw = raw.replace(b"PK\x03\x04\x14\x00\x00\x00", b"PK\x03\x04\x14\x00\x01\x00")
        raw = raw.replace(b"PK\x01\x02\x14\x03\x14\x00\x00\x00",
                          b"PK\x01\x02\x14\x03\x14\x00\x01\x00")
    return raw


def syms(out: dict) -> dict[str, dict]:
    return {s["name"]: s for s in out["symbols"]}


def scan(msg: bytes, *args: str) -> tuple[int, dict, dict]:
    rc, out = check_json(msg, *RCPT, *args)
    return rc, out, syms(out)


# -- names and types --------------------------------------------------------------------------
def test_executable_attachment_is_rejected_naming_the_file():
    rc, out, s = scan(message(("setup.exe", EXE, "application/octet-stream")))
    assert "ATTACH_BANNED_EXT" in s and "setup.exe" in s["ATTACH_BANNED_EXT"]["options"]
    assert out["action"] == "reject" and rc == 8
    det = out["recipient_details"]["bob@example.org"]
    assert det["code"] == 554 and "setup.exe" in det["reason"]


@pytest.mark.parametrize("name", ["report.js", "run.VBS", "x.hta", "a.ps1", "b.lnk", "c.scr",
                                  "evil.exe.", "evil.exe  "])
def test_default_banned_extensions(name):
    rc, out, s = scan(message((name, b"payload", "application/octet-stream")))
    assert "ATTACH_BANNED_EXT" in s, (name, s)


def test_double_extension():
    rc, out, s = scan(message(("invoice.pdf.exe", EXE, "application/pdf")))
    assert {"ATTACH_DOUBLE_EXT", "ATTACH_BANNED_EXT"} <= set(s)
    assert rc == 8
    # a dotted name that is not a decoy is not a double extension
    rc, out, s = scan(message(("release.1.2.tar.gz", gzip.compress(b"x"), "application/gzip")))
    assert "ATTACH_DOUBLE_EXT" not in s


def test_spaces_before_the_real_extension_do_not_hide_it():
    rc, out, s = scan(message(("invoice.pdf          .exe", EXE, "application/pdf")))
    assert "ATTACH_DOUBLE_EXT" in s and "ATTACH_BANNED_EXT" in s


def test_right_to_left_override_in_name():
    rc, out, s = scan(message(("photo\u202egpj.exe", EXE, "image/jpeg")))
    assert "ATTACH_RTLO" in s


def test_banned_declared_mime_type():
    rc, out, s = scan(message(("tool", b"#!/bin/sh\necho hi\n", "application/x-sh")))
    assert "ATTACH_BANNED_TYPE" in s and rc == 8


def test_magic_bytes_beat_a_lying_content_type():
    rc, out, s = scan(message(("holiday.jpg", EXE, "image/jpeg")))
    assert "ATTACH_TYPE_MISMATCH" in s
    assert "x-dosexec" in s["ATTACH_BANNED_TYPE"]["options"][0]
    assert out["action"] == "reject"
    # not executable but still a lie: a "PDF" that is a PNG only gets the mismatch symbol
    png = b"\x89PNG\r\n\x1a\n" + b"\x00" * 100
    rc, out, s = scan(message(("doc.pdf", png, "application/pdf")))
    assert "ATTACH_TYPE_MISMATCH" in s and "ATTACH_BANNED_TYPE" not in s
    assert out["action"] == "accept"


def test_honest_attachments_get_no_symbols():
    docx = make_zip({"[Content_Types].xml": b"<Types/>", "word/document.xml": b"<w/>"})
    rc, out, s = scan(message(
        ("paper.pdf", b"%PDF-1.4\n%%EOF\n", "application/pdf"),
        ("pic.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 50, "image/png"),
        ("letter.docx", docx,
         "application/vnd.openxmlformats-officedocument.wordprocessingml.document"),
        ("data.zip", make_zip({"a.csv": b"1,2\n"}), "application/zip"),
        ("notes.txt", b"plain notes\n", "text/plain")))
    ours = {n for n in s if n.startswith(("ATTACH_", "ARCHIVE_", "OFFICE_", "MIME_"))}
    assert not ours, ours
    assert out["action"] == "accept" and rc == 0


def test_banned_action_quarantine_and_score():
    msg = message(("setup.exe", EXE, "application/octet-stream"))
    rc, out, s = scan(msg, "--set", "attachments.banned_action=quarantine")
    assert out["action"] == "quarantine" and rc == 5
    rc, out, s = scan(msg, "--set", "attachments.banned_action=score")
    assert s["ATTACH_BANNED_EXT"]["score"] == 8.0  # rules/50-virus-scores.toml
    assert out["action"] in ("quarantine", "reject")  # the score decides


def test_banned_lists_are_configurable():
    msg = message(("setup.exe", EXE, "application/octet-stream"))
    rc, out, s = scan(msg, "--set", 'attachments.banned_extensions=["bat"]',
                      "--set", "attachments.banned_mime_types=[]")
    assert "ATTACH_BANNED_EXT" not in s
    # the content is still an executable: detected by magic bytes
    assert "ATTACH_BANNED_TYPE" not in s or "by content" in s["ATTACH_BANNED_TYPE"]["options"][0]


# -- archives -----------------------------------------------------------------------------------
def test_banned_name_inside_a_zip():
    z = make_zip({"docs/readme.txt": b"hi", "docs/setup.exe": EXE})
    rc, out, s = scan(message(("docs.zip", z, "application/zip")))
    assert "docs.zip/docs/setup.exe" in s["ARCHIVE_BANNED_NAME"]["options"]
    assert rc == 8


def test_nested_zips_are_opened_down_to_the_depth_limit():
    inner = make_zip({"payload.js": b"alert(1)"})
    lvl2 = make_zip({"inner.zip": inner})
    lvl3 = make_zip({"lvl2.zip": lvl2})
    rc, out, s = scan(message(("outer.zip", lvl3, "application/zip")))
    assert any(o.endswith("inner.zip/payload.js") for o in s["ARCHIVE_BANNED_NAME"]["options"])
    rc, out, s = scan(message(("outer.zip", lvl3, "application/zip")),
                      "--set", "attachments.archive_depth=2")
    assert "ARCHIVE_TOO_DEEP" in s and "ARCHIVE_BANNED_NAME" not in s


def test_tar_gz_and_gz_names():
    b = io.BytesIO()
    with tarfile.open(fileobj=b, mode="w:gz") as t:
        data = b"MZ fake"
        info = tarfile.TarInfo("bin/tool.exe")
        info.size = len(data)
        t.addfile(info, io.BytesIO(data))
    rc, out, s = scan(message(("bundle.tar.gz", b.getvalue(), "application/gzip")))
    assert "bundle.tar.gz/bin/tool.exe" in s["ARCHIVE_BANNED_NAME"]["options"]
    rc, out, s = scan(message(("invoice.exe.gz", gzip.compress(EXE), "application/gzip")))
    assert "ARCHIVE_BANNED_NAME" in s


def test_7z_names_and_encryption():
    py7zr = pytest.importorskip("py7zr")
    b = io.BytesIO()
    with py7zr.SevenZipFile(b, "w") as z:
        z.writestr(EXE, "setup.exe")
    rc, out, s = scan(message(("a.7z", b.getvalue(), "application/x-7z-compressed")))
    assert "a.7z/setup.exe" in s["ARCHIVE_BANNED_NAME"]["options"]
    b = io.BytesIO()
    with py7zr.SevenZipFile(b, "w", password="secret", header_encryption=True) as z:
        z.writestr(b"hidden", "hidden.txt")
    rc, out, s = scan(message(("locked.7z", b.getvalue(), "application/x-7z-compressed")))
    assert "ARCHIVE_ENCRYPTED" in s, s


def make_rar(files: list[tuple[str, bytes]], encrypted: bool = False) -> bytes:
    """A minimal RAR 4 archive with stored members, built by hand from the format (no rar
    tool is available offline): marker, archive header, one file header per member, end."""
    import struct
    import zlib

    def hdr(htype: int, flags: int, body: bytes) -> bytes:
        rest = struct.pack("<BHH", htype, flags, 7 + len(body)) + body
        return struct.pack("<H", zlib.crc32(rest) & 0xFFFF) + rest

    out = b"Rar!\x1a\x07\x00" + hdr(0x73, 0, b"\x00" * 6)
    for name, data in files:
        nb = name.encode()
        flags = 0x8000 | (0x04 if encrypted else 0)  # LONG_BLOCK, PASSWORD
        body = struct.pack("<IIBIIBBHI", len(data), len(data), 2, zlib.crc32(data), 0, 20,
                           0x30, len(nb), 0x20) + nb
        out += hdr(0x74, flags, body) + data
    return out + hdr(0x7B, 0x4000, b"")


def test_rar_names_and_encryption():
    pytest.importorskip("rarfile")
    rar = make_rar([("docs/readme.txt", b"hi"), ("docs/setup.exe", EXE)])
    rc, out, s = scan(message(("docs.rar", rar, "application/vnd.rar")))
    assert "docs.rar/docs/setup.exe" in s["ARCHIVE_BANNED_NAME"]["options"], s
    rc, out, s = scan(message(("locked.rar", make_rar([("x.txt", b"hi")], encrypted=True),
                               "application/vnd.rar")))
    assert "ARCHIVE_ENCRYPTED" in s, s


def test_clamav_testfile_archives_list_the_exe_inside():
    if not TESTFILES.exists():
        pytest.skip("clamav-testfiles not installed")
    for name in ("clam.zip", "clam.7z", "clam.tar.gz"):
        data = (TESTFILES / name).read_bytes()
        rc, out, s = scan(message((name, data, "application/octet-stream")))
        assert "ARCHIVE_BANNED_NAME" in s, (name, s)


def test_encrypted_zip():
    z = make_zip({"contract.doc": b"secret"}, encrypt_flag=True)
    rc, out, s = scan(message(("contract.zip", z, "application/zip")))
    assert "ARCHIVE_ENCRYPTED" in s


@pytest.mark.skipif(shutil.which("zip") is None, reason="zip command not installed")
def test_really_encrypted_zip_made_by_zip(tmp_path):
    (tmp_path / "a.txt").write_text("secret")
    subprocess.run(["zip", "-q", "-P", "pw", "a.zip", "a.txt"], cwd=tmp_path, check=True)
    rc, out, s = scan(message(("a.zip", (tmp_path / "a.zip").read_bytes(), "application/zip")))
    assert "ARCHIVE_ENCRYPTED" in s


def test_office_macros():
    docm = make_zip({"[Content_Types].xml": b"<Types/>", "word/document.xml": b"<w/>",
                     "word/vbaProject.bin": b"\xd0\xcf\x11\xe0" + b"\x00" * 100})
    rc, out, s = scan(message(("offer.docm", docm,
                               "application/vnd.ms-word.document.macroEnabled.12")))
    assert "offer.docm" in s["OFFICE_MACROS"]["options"]
    # inside a zip too
    rc, out, s = scan(message(("offer.zip", make_zip({"offer.docm": docm}), "application/zip")))
    assert "OFFICE_MACROS" in s


def test_ole_document_without_macros_is_read_without_symbols():
    if not TESTFILES.exists():
        pytest.skip("clamav-testfiles not installed")
    data = (TESTFILES / "clam.ole.doc").read_bytes()
    rc, out, s = scan(message(("clam.doc", data, "application/msword")))
    assert "OFFICE_MACROS" not in s and "PLUGIN_ERROR" not in s


# -- protection ---------------------------------------------------------------------------------
def test_zip_bomb_by_ratio_and_by_size():
    bomb = make_zip({"zeros.bin": b"\x00" * (5 * 1024 * 1024)})
    assert len(bomb) < 100_000
    rc, out, s = scan(message(("bomb.zip", bomb, "application/zip")))
    assert "ARCHIVE_BOMB" in s and "ratio" in s["ARCHIVE_BOMB"]["options"][0]
    rc, out, s = scan(message(("bomb.zip", bomb, "application/zip")),
                      "--set", "attachments.max_ratio=100000",
                      "--set", "attachments.max_uncompressed=1MB")
    assert "ARCHIVE_BOMB" in s and "unpacks to more than" in s["ARCHIVE_BOMB"]["options"][0]


def test_nested_zip_bomb_is_stopped():
    inner = make_zip({f"z{i}.bin": b"\x00" * (2 * 1024 * 1024) for i in range(4)})
    layer = inner
    for _ in range(2):
        layer = make_zip({f"l{i}.zip": layer for i in range(8)})
    rc, out, s = scan(message(("42.zip", layer, "application/zip")))
    assert "ARCHIVE_BOMB" in s
    assert "PLUGIN_ERROR" not in s and "PLUGIN_TIMEOUT" not in s
    # deeper than the depth limit: stopped there
    layer = make_zip({f"l{i}.zip": layer for i in range(8)})
    rc, out, s = scan(message(("42.zip", layer, "application/zip")))
    assert "ARCHIVE_TOO_DEEP" in s and "PLUGIN_ERROR" not in s
    # many nested archives that each look harmless still hit the message-wide unpack budget
    def one(i):
        return make_zip({"inner.zip": make_zip({"f.bin": os.urandom(400_000)})})
    rc, out, s = scan(message(*[(f"a{i}.zip", one(i), "application/zip") for i in range(3)]),
                      "--set", "attachments.max_uncompressed=1MB")
    assert "nested archives unpack" in s["ARCHIVE_BOMB"]["options"][0], s


def test_deeply_nested_mime_gives_a_symbol():
    depth = 60
    head = "From: a@example.com\r\nTo: b@example.org\r\nSubject: deep\r\nMIME-Version: 1.0\r\n"
    body = "Content-Type: multipart/mixed; boundary=b0\r\n\r\n"
    for i in range(1, depth):
        body += f"--b{i-1}\r\nContent-Type: multipart/mixed; boundary=b{i}\r\n\r\n"
    body += f"--b{depth-1}\r\nContent-Type: text/plain\r\n\r\nhi\r\n"
    rc, out, s = scan((head + body).encode())
    assert "MIME_DEEP_NESTING" in s


def test_absurd_mime_nesting_is_a_symbol_not_a_crash():
    depth = 5000
    body = "Content-Type: multipart/mixed; boundary=b0\r\n\r\n"
    for i in range(1, depth):
        body += f"--b{i-1}\r\nContent-Type: multipart/mixed; boundary=b{i}\r\n\r\n"
    rc, out, s = scan(("Subject: x\r\n" + body).encode())
    assert "MIME_DEEP_NESTING" in s and "PLUGIN_ERROR" not in s
    assert rc in (0, 3, 4, 5)


def test_thousands_of_parts():
    m = EmailMessage()
    m["From"], m["To"], m["Subject"] = "a@example.com", "b@example.org", "many"
    m.set_content("x")
    for i in range(3000):
        m.add_attachment(b"x", maintype="application", subtype="octet-stream",
                         filename=f"f{i}.dat")
    rc, out, s = scan(m.as_bytes())
    assert "MIME_TOO_MANY_PARTS" in s and "PLUGIN_ERROR" not in s


def test_malformed_base64():
    msg = (b"From: a@example.com\r\nTo: b@example.org\r\nSubject: b64\r\nMIME-Version: 1.0\r\n"
           b"Content-Type: multipart/mixed; boundary=X\r\n\r\n--X\r\nContent-Type: text/plain\r\n"
           b"\r\nhi\r\n--X\r\nContent-Type: application/pdf; name=a.pdf\r\n"
           b"Content-Transfer-Encoding: base64\r\n\r\n"
           b"JVBERi0x!!!not*base64@@\r\nQUJD=\r\n--X--\r\n")
    rc, out, s = scan(msg)
    assert "a.pdf" in s["MIME_BAD_BASE64"]["options"]
    good = message(("a.pdf", b"%PDF-1.4\n", "application/pdf"))
    assert "MIME_BAD_BASE64" not in scan(good)[2]


def test_mime_torture_corpora_never_crash_the_scanner():
    from filterd.model import Message
    from filterd_plugins.attachments import Scanner, CONFIG
    import tomllib

    scanner = Scanner(tomllib.loads(CONFIG))
    files = [p for p in (DATA / "mime").rglob("*") if p.is_file()]
    assert files
    for p in files:
        scanner.scan(Message(p.read_bytes()))  # must not raise
    # and a few hostile byte strings
    for raw in (b"", b"\x00" * 1000, b"Content-Type: multipart/mixed\r\n\r\n--\r\n",
                base64.b64encode(EXE)):
        scanner.scan(Message(raw))


def test_a_script_named_as_text_is_not_banned_by_its_shebang():
    rc, out, s = scan(message(("tool.py", b"#!/usr/bin/env python3\nprint(1)\n", "text/x-python")))
    assert "ATTACH_BANNED_TYPE" not in s and out["action"] == "accept"
