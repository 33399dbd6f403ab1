"""A minimal milter-protocol (version 6) client, MTA side, for driving `filterd milter` with
both well-formed and hostile input in tests. Follows the wire format of libmilter's mfdef.h:
each packet is a 4-byte big-endian length, a command byte and its data."""
from __future__ import annotations

import socket
import struct

import milter as M

NR_FOR = {b"C": M.P_NR_CONN, b"H": M.P_NR_HELO, b"M": M.P_NR_MAIL, b"R": M.P_NR_RCPT,
          b"L": M.P_NR_HDR, b"N": M.P_NR_EOH, b"B": M.P_NR_BODY}
SKIP_FOR = {b"N": M.P_NOEOH, b"T": M.P_NODATA}
ALL_PROTO = 0x1FFFFF
ALL_ACTIONS = 0x1FF


class MilterClient:
    def __init__(self, port: int | str, timeout: float = 30.0):
        if isinstance(port, str):  # unix socket path
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(timeout)
            self.sock.connect(port)
        else:
            self.sock = socket.create_connection(("127.0.0.1", port), timeout)
        self.protocol = 0
        self.actions = 0

    # -- wire ------------------------------------------------------------------------------
    def send(self, cmd: bytes, data: bytes = b"") -> None:
        self.sock.sendall(struct.pack("!I", len(data) + 1) + cmd + data)

    def _recv_exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("milter closed the connection")
            buf += chunk
        return buf

    def read(self) -> tuple[bytes, bytes]:
        (n,) = struct.unpack("!I", self._recv_exact(4))
        data = self._recv_exact(n)
        return data[:1], data[1:]

    def command(self, cmd: bytes, data: bytes = b""):
        """Send a command; return its reply, or None when the milter negotiated no reply."""
        if cmd in SKIP_FOR and self.protocol & SKIP_FOR[cmd]:
            return None
        self.send(cmd, data)
        if cmd in NR_FOR and self.protocol & NR_FOR[cmd]:
            return None
        return self.read()

    # -- steps -----------------------------------------------------------------------------
    def negotiate(self) -> None:
        self.send(b"O", struct.pack("!III", 6, ALL_ACTIONS, ALL_PROTO))
        cmd, data = self.read()
        assert cmd == b"O", (cmd, data)
        _, self.actions, self.protocol = struct.unpack("!III", data[:12])

    def macros(self, stage: bytes, **values: str) -> None:
        """Macros for the next command (stage b"C", b"H", b"M", b"R", b"E"); no reply."""
        data = b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in values.items())
        self.send(b"D", stage + data)

    def connect(self, host: str = "client.example", ip: str = "192.0.2.10", port: int = 4321):
        return self.command(b"C", host.encode() + b"\0" + b"4" + struct.pack("!H", port)
                            + ip.encode() + b"\0")

    def helo(self, name: str = "client.example"):
        return self.command(b"H", name.encode() + b"\0")

    def mail(self, addr: str):
        return self.command(b"M", f"<{addr}>".encode() + b"\0")

    def rcpt(self, addr: str):
        return self.command(b"R", f"<{addr}>".encode() + b"\0")

    def header(self, name: str, value: str | bytes):
        v = value.encode() if isinstance(value, str) else value
        if self.protocol & M.P_HDR_LEADSPC:
            v = b" " + v
        return self.command(b"L", name.encode() + b"\0" + v + b"\0")

    def eoh(self):
        return self.command(b"N")

    def body(self, data: bytes):
        replies = []
        for i in range(0, len(data), 65535):
            replies.append(self.command(b"B", data[i:i + 65535]))
        return replies

    def eom(self) -> list[tuple[bytes, bytes]]:
        """End of message: all modification packets and the final reply (last item)."""
        self.send(b"E")
        out = []
        while True:
            cmd, data = self.read()
            out.append((cmd, data))
            if cmd in (b"a", b"c", b"r", b"t", b"d", b"y"):
                return out

    def message(self, sender: str, rcpts: list[str], headers: list[tuple[str, str]],
                body: bytes) -> list[tuple[bytes, bytes]]:
        self.connect()
        self.helo()
        self.mail(sender)
        for r in rcpts:
            self.rcpt(r)
        return self.content(headers, body)

    def content(self, headers: list[tuple[str, str]], body: bytes) -> list[tuple[bytes, bytes]]:
        """Headers, end of headers, one body chunk and end of message: the replies to EOM."""
        for n, v in headers:
            self.header(n, v)
        self.eoh()
        self.body(body)
        return self.eom()

    def quit(self) -> None:
        try:
            self.send(b"Q")
        finally:
            self.sock.close()

    def close(self) -> None:
        self.sock.close()
