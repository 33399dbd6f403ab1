"""The durable spool: where an accepted message lives until every recipient is done.

Layout under the spool directory::

    tmp/       files being written (never acknowledged; cleaned at start-up)
    active/    <qid>          the message: a header line, the envelope (JSON), the data
               <qid>.state    per-recipient delivery state (JSON), absent until the first attempt
    hold/      same as active/, not delivered until released (`filterd queue release`)
    failed/    messages that kept failing for internal reasons (kept for an operator to look at)
    corrupt/   files that could not be parsed at recovery (kept, never deleted by filterd)
    flush      touched by `filterd queue flush|release|requeue`: running daemons rescan

Durability: a message is written to ``tmp/``, fsync'd, renamed into ``active/`` (or ``hold/``)
and the directory is fsync'd before :meth:`Spool.enqueue` returns — only then may the caller
answer 250. Concurrent enqueues share one commit (group commit): the messages that arrived while
the previous commit was on disk are written and fsync'd in parallel (the file system merges
concurrent fsyncs into few journal commits), then one directory fsync covers all their renames.
Removing a finished message needs no fsync: if the unlink is lost in a crash the message is
delivered again (a duplicate, never a loss).

Several processes may share one spool (worker processes of ``filterd serve``, the ``filterd
queue`` command): a process works on a message only while holding an exclusive ``flock`` on its
file; the kernel drops the lock when the process dies, so a message of a killed worker is picked
up again by the next scan.
"""
from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

log = logging.getLogger("filterd.queue")

MAGIC = b"FILTERD-SPOOL 1\n"
AREAS = ("active", "hold", "failed", "corrupt")


class SpoolError(Exception):
    """A spool operation failed (names the file and the reason)."""


class Locked(SpoolError):
    """Another process (or task) is working on this message right now."""


class NotFound(SpoolError):
    """No message with this queue id in the spool."""


@dataclass
class Envelope:
    mail_from: str  # "" = null sender
    recipients: list[str]  # recipients to deliver (or hold)
    queue_id: str = ""  # assigned by enqueue
    received_at: float = 0.0
    meta: dict = field(default_factory=dict)  # client ip/helo/auth, symbols, score, trace id
    hold: bool = False  # True: keep in the hold area until `filterd queue release`
    mail_params: dict = field(default_factory=dict)  # ESMTP params (ENVID, RET, SMTPUTF8, ...)
    rcpt_params: dict = field(default_factory=dict)  # address -> ESMTP params (NOTIFY, ORCPT)

    def to_json(self) -> dict:
        return {"mail_from": self.mail_from, "recipients": list(self.recipients),
                "queue_id": self.queue_id, "received_at": self.received_at, "meta": self.meta,
                "hold": self.hold, "mail_params": self.mail_params,
                "rcpt_params": self.rcpt_params}

    @classmethod
    def from_json(cls, d: dict) -> "Envelope":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)


@dataclass
class RcptState:
    status: str = "pending"  # pending | delivered | failed (permanent, bounced) | expired
    attempts: int = 0
    response: str = ""  # last reply of the next hop (or local delivery note / error)
    updated: float = 0.0

    @property
    def done(self) -> bool:
        return self.status != "pending"


@dataclass
class DeliveryState:
    """Per-message delivery state, stored beside the message as ``<qid>.state``."""

    attempts: int = 0
    next_attempt: float = 0.0
    last_attempt: float = 0.0
    warned: bool = False  # a delay warning was sent
    internal_errors: int = 0  # unexpected errors while delivering (moves to failed/ past a limit)
    recipients: dict[str, RcptState] = field(default_factory=dict)

    def rcpt(self, address: str) -> RcptState:
        st = self.recipients.get(address)
        if st is None:
            st = self.recipients[address] = RcptState()
        return st

    def to_json(self) -> dict:
        d = asdict(self)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "DeliveryState":
        st = cls(**{k: d[k] for k in ("attempts", "next_attempt", "last_attempt", "warned",
                                       "internal_errors") if k in d})
        for addr, r in (d.get("recipients") or {}).items():
            st.recipients[addr] = RcptState(**{k: r[k] for k in RcptState.__dataclass_fields__
                                               if k in r})
        return st


@dataclass
class QueueEntry:
    """What `filterd queue list` shows about one message."""

    queue_id: str
    area: str
    envelope: Envelope
    size: int
    state: DeliveryState

    def to_json(self) -> dict:
        env = self.envelope
        return {
            "queue_id": self.queue_id, "area": self.area, "size": self.size,
            "mail_from": env.mail_from, "received_at": env.received_at,
            "recipients": {r: asdict(self.state.recipients.get(r) or RcptState())
                           for r in env.recipients},
            "attempts": self.state.attempts, "next_attempt": self.state.next_attempt,
            "last_attempt": self.state.last_attempt, "meta": env.meta,
        }


def new_queue_id() -> str:
    """Sortable by arrival (microsecond clock) and unique across processes (random suffix)."""
    return f"{time.time_ns() // 1000:014X}{secrets.token_hex(3).upper()}"


def encode(envelope: Envelope, data: bytes) -> bytes:
    head = dict(envelope.to_json(), size=len(data))
    return MAGIC + json.dumps(head, separators=(",", ":"), ensure_ascii=False).encode() + b"\n" \
        + data


def decode_header(path: Path, fileobj) -> tuple[Envelope, int, int]:
    """Read the header of a spool file: (envelope, data offset, data size). Raises SpoolError
    when the file is not a complete spool file."""
    magic = fileobj.read(len(MAGIC))
    if magic != MAGIC:
        raise SpoolError(f"{path}: not a filterd spool file (bad first line)")
    line = fileobj.readline(10 * 1024 * 1024)
    if not line.endswith(b"\n"):
        raise SpoolError(f"{path}: envelope line is truncated")
    try:
        head = json.loads(line)
        size = int(head.pop("size"))
        env = Envelope.from_json(head)
    except (ValueError, KeyError, TypeError) as exc:
        raise SpoolError(f"{path}: envelope is not valid: {exc}") from exc
    if not isinstance(env.recipients, list) or not isinstance(env.mail_from, str):
        raise SpoolError(f"{path}: envelope has no sender/recipient list")
    offset = len(MAGIC) + len(line)
    actual = os.fstat(fileobj.fileno()).st_size - offset
    if actual != size:
        raise SpoolError(f"{path}: data is {actual} bytes, envelope says {size} (truncated?)")
    return env, offset, size


class MessageHandle:
    """An open, exclusively locked spool message. Use as a context manager (unlocks on exit)."""

    def __init__(self, spool: "Spool", qid: str, area: str, fileobj):
        self.spool = spool
        self.queue_id = qid
        self.area = area
        self.file = fileobj
        self.envelope: Envelope
        self._offset = 0
        self.size = 0
        self.state = DeliveryState()
        self.has_state_file = True  # unknown until parsed: assume so

    @property
    def path(self) -> Path:
        return self.spool.dir / self.area / self.queue_id

    @property
    def state_path(self) -> Path:
        return self.spool.dir / self.area / (self.queue_id + ".state")

    def read_data(self) -> bytes:
        self.file.seek(self._offset)
        data = self.file.read(self.size)
        if len(data) != self.size:
            raise SpoolError(f"{self.path}: short read ({len(data)} of {self.size} bytes)")
        return data

    def save_state(self) -> None:
        """Atomically replace the state file (tmp → fsync → rename → fsync directory)."""
        self.spool._write_atomic(self.state_path,
                                 json.dumps(self.state.to_json(), separators=(",", ":")).encode())
        self.has_state_file = True

    def remove(self) -> None:
        """The message is finished: delete it (no fsync: a lost unlink means a duplicate)."""
        for p in ((self.state_path, self.path) if self.has_state_file else (self.path,)):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass

    def move(self, area: str) -> None:
        """Move the message (and its state) to another area: hold, active, failed."""
        if area == self.area:
            return
        dest = self.spool.dir / area
        if self.state_path.exists():
            os.rename(self.state_path, dest / (self.queue_id + ".state"))
        os.rename(self.path, dest / self.queue_id)
        self.spool._fsync_dir(dest)
        self.spool._fsync_dir(self.spool.dir / self.area)
        self.area = area

    def discard(self) -> None:
        """remove() and close() (for a worker thread: freeing the inode can block)."""
        try:
            self.remove()
        finally:
            self.close()

    def close(self) -> None:
        try:
            fcntl.flock(self.file.fileno(), fcntl.LOCK_UN)
        finally:
            self.file.close()
            with self.spool._lock:
                self.spool._local_locks.discard(self.queue_id)

    def __enter__(self) -> "MessageHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# A batch of at most this many bytes is written from the event loop (page cache only); bigger
# batches are written by a thread.
INLINE_WRITE_BYTES = 1 << 20


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


class Spool:
    def __init__(self, directory: str | Path, fsync: bool = True):
        self.dir = Path(directory)
        self.fsync = fsync
        for sub in ("tmp",) + AREAS:
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        self._pending: list[tuple[str, str, bytes, asyncio.Future]] = []
        self._committers: set[asyncio.Task] = set()
        self.max_commits_in_flight = 2
        self._executor = ThreadPoolExecutor(max_workers=self.max_commits_in_flight,
                                            thread_name_prefix="spool-commit")
        self._file_pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="spool-write")
        self._local_locks: set[str] = set()  # flock does not exclude within one process
        self._lock = threading.Lock()
        self.commits = 0  # number of group commits (for tests and stats)

    # -- writing -------------------------------------------------------------------------------
    async def enqueue(self, envelope: Envelope, data: bytes) -> str:
        """Returns the queue id ONLY after the message data and envelope are on disk and
        fsync'd (files and directory entries). The caller answers 250 after this returns.
        Concurrent enqueues are committed together (group commit)."""
        if not envelope.recipients:
            raise SpoolError("enqueue: the envelope has no recipients")
        qid = new_queue_id()
        envelope.queue_id = qid
        if not envelope.received_at:
            envelope.received_at = time.time()
        blob = encode(envelope, bytes(data))
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._pending.append((qid, "hold" if envelope.hold else "active", blob, fut))
        # (a finished task leaves the set only in a later callback: count the running ones)
        if sum(not t.done() for t in self._committers) < self.max_commits_in_flight:
            # up to two commits overlap: the next batch's files are written while the previous
            # batch's directory fsync runs (each batch still fsyncs the directory itself)
            task = loop.create_task(self._commit_loop())
            self._committers.add(task)
            task.add_done_callback(self._committers.discard)
        await fut
        return qid

    async def _commit_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            batch, self._pending = self._pending, []
            items = [(q, a, b) for q, a, b, _ in batch]
            try:
                if self.fsync and sum(len(b) for _, _, b in items) <= INLINE_WRITE_BYTES:
                    # writing a few small files into the page cache is quicker than handing it
                    # to a thread: only the waits for the disk (fsyncs) leave the event loop,
                    # in one hand-off per batch
                    written, errors = self._write_files(items)
                    errors.update(await loop.run_in_executor(self._executor, self._sync_batch,
                                                             written))
                else:
                    errors = await loop.run_in_executor(self._executor, self._write_batch, items)
            except BaseException as exc:  # the whole batch failed (directory fsync)
                errors = {q: exc for q, *_ in batch}
            self.commits += 1
            for qid, _, _, fut in batch:
                if fut.done():
                    continue
                if qid in errors:
                    err = errors[qid]
                    fut.set_exception(SpoolError(f"cannot write message to spool {self.dir}: "
                                                 f"{err}"))
                else:
                    fut.set_result(qid)

    def _write_files(self, batch: list[tuple[str, str, bytes]]
                     ) -> tuple[list[tuple[str, str, int]], dict[str, Exception]]:
        """Create and write each message's temporary file (no fsync yet): the open
        descriptors to sync, and the messages that failed."""
        written, errors = [], {}
        for qid, area, blob in batch:
            tmp = self.dir / "tmp" / qid
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except OSError as exc:
                errors[qid] = exc
                continue
            try:
                view = memoryview(blob)
                while view:
                    view = view[os.write(fd, view):]
            except OSError as exc:
                os.close(fd)
                _unlink_quietly(tmp)
                errors[qid] = exc
                continue
            written.append((qid, area, fd))
        return written, errors

    def _sync_batch(self, written: list[tuple[str, str, int]]) -> dict[str, Exception]:
        """fsync the written files (in parallel: the file system merges concurrent fsyncs
        into few journal commits), rename each into its area, then fsync each directory once."""
        def sync(fd: int) -> Exception | None:
            try:
                os.fsync(fd)
                return None
            except OSError as exc:
                return exc

        fds = [fd for _, _, fd in written]
        if not self.fsync:
            results: list[Exception | None] = [None] * len(fds)
        elif len(fds) == 1:
            results = [sync(fds[0])]
        else:
            results = list(self._file_pool.map(sync, fds))
        errors: dict[str, Exception] = {}
        areas = set()
        for (qid, area, fd), exc in zip(written, results):
            tmp = self.dir / "tmp" / qid
            try:
                os.close(fd)
                if exc is not None:
                    raise exc
                os.rename(tmp, self.dir / area / qid)
                areas.add(area)
            except OSError as e:
                _unlink_quietly(tmp)
                errors[qid] = e
        for area in areas:
            self._fsync_dir(self.dir / area)
        return errors

    def _write_batch(self, batch: list[tuple[str, str, bytes]]) -> dict[str, Exception]:
        """Write, fsync and rename every file of the batch, then fsync each directory once
        (all in the calling thread: for batches too big to write from the event loop)."""
        written, errors = self._write_files(batch)
        errors.update(self._sync_batch(written))
        return errors

    def _fsync_dir(self, d: Path) -> None:
        if not self.fsync:
            return
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _write_atomic(self, path: Path, content: bytes) -> None:
        tmp = self.dir / "tmp" / f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, content)
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
        self._fsync_dir(path.parent)

    # -- reading and locking -----------------------------------------------------------------
    def find(self, qid: str) -> str:
        """The area a message is in; raises NotFound."""
        if not qid or "/" in qid or qid.startswith("."):
            raise NotFound(f"bad queue id {qid!r}")
        for area in AREAS:
            if (self.dir / area / qid).exists():
                return area
        raise NotFound(f"no message {qid} in spool {self.dir}")

    def open(self, qid: str, area: str | None = None, parse: bool = True) -> MessageHandle:
        """Open and exclusively lock a message. Raises Locked if another process or task has it,
        NotFound if it is gone, SpoolError if it cannot be parsed (the caller may quarantine it
        with :meth:`mark_corrupt`)."""
        area = area or self.find(qid)
        path = self.dir / area / qid
        with self._lock:
            if qid in self._local_locks:
                raise Locked(f"{qid} is being worked on by this process")
            self._local_locks.add(qid)
        try:
            try:
                f = open(path, "rb")
            except FileNotFoundError:
                raise NotFound(f"no message {qid} in {self.dir / area}") from None
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.close()
                raise Locked(f"{qid} is being worked on by another process") from None
            # it may have been moved or removed between open() and flock()
            try:
                same = os.stat(path).st_ino == os.fstat(f.fileno()).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                f.close()
                raise NotFound(f"{qid} was moved or removed meanwhile")
        except BaseException:
            self._local_locks.discard(qid)
            raise
        h = MessageHandle(self, qid, area, f)
        if parse:
            try:
                h.envelope, h._offset, h.size = decode_header(path, f)
                try:
                    h.state = DeliveryState.from_json(json.loads(h.state_path.read_bytes()))
                except FileNotFoundError:
                    h.has_state_file = False
            except (SpoolError, ValueError, OSError) as exc:
                h.close()
                raise SpoolError(str(exc)) from exc
        return h

    def mark_corrupt(self, qid: str, area: str, reason: str) -> None:
        """Move an unparseable file aside to corrupt/ (kept for the operator)."""
        src = self.dir / area / qid
        dest = self.dir / "corrupt" / qid
        try:
            os.rename(src, dest)
            st = self.dir / area / (qid + ".state")
            if st.exists():
                os.rename(st, self.dir / "corrupt" / (qid + ".state"))
            (self.dir / "corrupt" / (qid + ".reason")).write_text(reason + "\n")
            self._fsync_dir(self.dir / "corrupt")
            log.error("spool: moved %s to %s: %s", src, dest, reason)
        except FileNotFoundError:
            pass

    def ids(self, area: str = "active") -> list[str]:
        try:
            names = os.listdir(self.dir / area)
        except FileNotFoundError:
            return []
        return sorted(n for n in names if "." not in n)

    def entries(self, areas=("active", "hold", "failed")) -> list[QueueEntry]:
        """Every message with its envelope and state, read without locking (for listing)."""
        out = []
        for area in areas:
            for qid in self.ids(area):
                path = self.dir / area / qid
                try:
                    with open(path, "rb") as f:
                        env, _, size = decode_header(path, f)
                    st = DeliveryState()
                    sp = self.dir / area / (qid + ".state")
                    if sp.exists():
                        st = DeliveryState.from_json(json.loads(sp.read_bytes()))
                except (FileNotFoundError, SpoolError, ValueError):
                    continue
                out.append(QueueEntry(qid, area, env, size, st))
        return out

    def recover(self, tmp_max_age: float = 600.0) -> list[tuple[str, float]]:
        """Start-up recovery: remove stale temp files (never acknowledged), move unparseable
        messages to corrupt/, and return (queue id, next attempt time) for every message in
        active/."""
        now = time.time()
        for name in os.listdir(self.dir / "tmp"):
            p = self.dir / "tmp" / name
            try:
                if now - p.stat().st_mtime > tmp_max_age:
                    p.unlink()
            except FileNotFoundError:
                pass
        due: list[tuple[str, float]] = []
        active = self.dir / "active"
        names = set(os.listdir(active))
        for name in sorted(names):
            if name.endswith(".state") and name[:-6] not in names:
                try:  # state of a finished message whose unlink was cut short
                    (active / name).unlink()
                except FileNotFoundError:
                    pass
                continue
            if "." in name:
                continue
            path = active / name
            try:
                with open(path, "rb") as f:
                    decode_header(path, f)
            except FileNotFoundError:
                continue
            except SpoolError as exc:
                self.mark_corrupt(name, "active", str(exc))
                continue
            nxt = 0.0
            sp = active / (name + ".state")
            if sp.exists():
                try:
                    nxt = DeliveryState.from_json(json.loads(sp.read_bytes())).next_attempt
                except (ValueError, TypeError, OSError) as exc:
                    log.warning("spool: state file %s unreadable (%s); delivering all "
                                "recipients again", sp, exc)
            due.append((name, nxt))
        return due

    def touch_flush(self) -> None:
        """Tell running daemons to rescan the spool now (flush/release/requeue)."""
        p = self.dir / "flush"
        with open(p, "a"):
            pass
        os.utime(p)

    def flush_mtime(self) -> float:
        try:
            return os.stat(self.dir / "flush").st_mtime_ns / 1e9
        except FileNotFoundError:
            return 0.0

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        self._file_pool.shutdown(wait=True)
