"""The spool: experiment specs dropped as files into `<state>/inbox/`.

Layout (each directory mode 0700, owned by the daemon's uid)::

    <state>/inbox/      where specs are dropped
    <state>/accepted/   <UTC timestamp>-<name>          specs that `submit` took
    <state>/rejected/   <UTC timestamp>-<name>          specs (or other entries) refused,
                        <UTC timestamp>-<name>.error    each with its reason, one text file

Contract of `Spool.scan()`, for every entry of the inbox:

- Names starting with '.' or ending with '.tmp' or '~' are skipped: they are writes in
  progress. Write a spec as a temp file (such a name) and rename it into place, and it is
  never read half-written. A file written in place is seen on its close-after-write event
  (Linux inotify), or by a periodic scan, which may find it half-written: use rename.
- Rejected without being opened (moved as they are, never followed): symlinks, directories,
  FIFOs, sockets, devices, files owned by another uid, files larger than `max_bytes`.
- A regular file is opened with O_NOFOLLOW|O_NONBLOCK and checked again through `fstat` of
  the open descriptor (so a swap after `lstat` is caught); it is rejected when it grew past
  `max_bytes`, holds a NUL byte, or is not UTF-8.
- Otherwise `submit(path)` is called with the inbox path. It returns to accept the spec
  (the file is then moved to `accepted/`) or raises ValueError (e.g. `SpecError`), whose
  text becomes the rejection reason; or it returns a `Later` and decides afterwards with
  `settle(later, reason)` (None accepts), the file waiting in the inbox meanwhile. The
  inbox is 0700, so only the daemon's uid (or root) can swap the file between the checks
  and `submit` reading it. Any other exception is logged and the file is left in the
  inbox, to be tried again by a later scan.
- If the daemon dies after `submit` returned but before the move, the next scan submits the
  file again: `submit` should refuse a duplicate (an existing experiment name) with
  ValueError.

Every processed entry is logged (accepted, or rejected with its reason) and returned as an
`Outcome`.

Threads: `start()` runs a watchdog Observer on the inbox. Its thread only *signals*: it sets
a flag and writes a byte to a pipe. Scanning, and so `submit`, happens only in the thread
that calls `scan()`/`poll()`, the daemon's loop. That loop either polls `pending()` or
registers `fileno()` (readable when a scan is wanted) with its selector, and calls `poll()`,
which scans when something is pending or `scan_interval` seconds (by `clock`) have passed
since the last scan: watchdog can drop events under load, the periodic full scan backs it up.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 1 << 20
DEFAULT_SCAN_INTERVAL = 30.0
_OPEN_FLAGS = (os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
               | getattr(os, "O_NOCTTY", 0))
#: Rejection reasons for entries that are not regular files, by file type.
_FILE_KINDS = {
    stat.S_IFDIR: "a directory, not a regular file",
    stat.S_IFLNK: "a symbolic link (not followed), not a regular file",
    stat.S_IFIFO: "a FIFO, not a regular file",
    stat.S_IFSOCK: "a socket, not a regular file",
    stat.S_IFCHR: "a character device, not a regular file",
    stat.S_IFBLK: "a block device, not a regular file",
}

Status = Literal["accepted", "rejected", "retry", "pending"]


@dataclass(frozen=True)
class Outcome:
    """What `scan` did with one inbox entry.

    `status` is "accepted" or "rejected" (then `moved_to` is the new path, None if the move
    failed), "retry" (submit failed unexpectedly; the file stays in the inbox), or "pending"
    (submit will decide later, through `Spool.settle`).
    `reason` says why for "rejected" and "retry".
    """

    name: str
    status: Status
    reason: str | None = None
    moved_to: Path | None = None


def is_ignored(name: str) -> bool:
    """True for names of writes in progress: '.*', '*.tmp', '*~'."""
    return name.startswith(".") or name.endswith((".tmp", "~"))


def kind_problem(st: os.stat_result) -> str | None:
    """Why an entry with this (l)stat is not a regular file, or None if it is one."""
    if stat.S_ISREG(st.st_mode):
        return None
    return _FILE_KINDS.get(stat.S_IFMT(st.st_mode), "not a regular file")


def stat_problem(st: os.stat_result, uid: int, max_bytes: int) -> str | None:
    """Why an entry is refused before reading it (kind, owner, size), or None."""
    problem = kind_problem(st)
    if problem is not None:
        return problem
    if st.st_uid != uid:
        return f"owned by uid {st.st_uid}, not by the daemon's uid {uid}"
    if st.st_size > max_bytes:
        return f"too large: {st.st_size} bytes (limit {max_bytes})"
    return None


def content_problem(data: bytes) -> str | None:
    """Why these bytes are not a text spec (NUL bytes, not UTF-8), or None."""
    if b"\0" in data:
        return "binary content: contains NUL bytes"
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"binary content: not UTF-8 ({exc.reason} at byte {exc.start})"
    return None


def read_at_most(fd: int, limit: int) -> bytes:
    """Read from `fd` until EOF or `limit` bytes, whichever comes first."""
    chunks: list[bytes] = []
    left = limit
    while left > 0:
        chunk = os.read(fd, min(left, 1 << 16))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def ensure_private_dir(path: Path) -> None:
    """Create `path` (and parents) if missing; make it mode 0700.

    Raises NotADirectoryError when it is not a real directory (a symlink included) and
    PermissionError when another uid owns it.
    """
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise NotADirectoryError(f"{path} is not a directory")
    if st.st_uid != os.geteuid():
        raise PermissionError(f"{path} is owned by uid {st.st_uid}, not {os.geteuid()}")
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(path, 0o700)


def utc_stamp(seconds: float) -> str:
    """A sortable UTC timestamp for file names: 20250131T235959.123456Z."""
    return datetime.fromtimestamp(seconds, tz=timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")


class Later:
    """What `submit` returns to decide about a file later, without blocking the loop: the
    file stays in the inbox, skipped by scans, until `Spool.settle(later, reason)`."""

    def __init__(self) -> None:
        self.name: str | None = None
        self.key: tuple[int, int] | None = None


class _Rejection(Exception):
    """Internal: the entry is refused for `reason`."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class _InboxHandler(FileSystemEventHandler):
    """Runs in watchdog's thread: turns inbox events into `Spool.request_scan()` calls.

    A created regular file waits for its close-after-write (or rename) event, so that a file
    written in place is not scanned while it is being written.
    """

    def __init__(self, spool: Spool):
        self._spool = spool

    def on_created(self, event: FileSystemEvent) -> None:
        path = self._in_inbox(event.src_path)
        if path is None:
            return
        try:
            regular = stat.S_ISREG(os.lstat(path).st_mode)
        except OSError:
            return
        if not regular:
            self._spool.request_scan()

    def on_moved(self, event: FileSystemEvent) -> None:
        if self._in_inbox(event.dest_path) is not None:
            self._spool.request_scan()

    def on_closed(self, event: FileSystemEvent) -> None:
        if self._in_inbox(event.src_path) is not None:
            self._spool.request_scan()

    def _in_inbox(self, raw: str | bytes) -> Path | None:
        path = Path(os.path.abspath(os.fsdecode(raw)))
        if path.parent != self._spool.inbox or is_ignored(path.name):
            return None
        return path


class Spool:
    """The inbox of spec files (see the module docstring for the whole contract).

    `submit(path)` is called from the thread that calls `scan`/`poll` only. `clock`
    (monotonic seconds) times the periodic scan; `wallclock` (epoch seconds) stamps the
    names of moved files. Creates `state_dir` (0700) if missing, and inbox/, accepted/,
    rejected/ with mode 0700; raises NotADirectoryError or PermissionError when one of those
    exists as a non-directory or belongs to another uid.
    """

    def __init__(self, state_dir: str | os.PathLike[str],
                 submit: Callable[[Path], Later | None],
                 max_bytes: int = DEFAULT_MAX_BYTES, clock: Callable[[], float] = time.monotonic,
                 *, scan_interval: float = DEFAULT_SCAN_INTERVAL,
                 wallclock: Callable[[], float] = time.time):
        self.state_dir = Path(os.path.abspath(state_dir))
        self.inbox = self.state_dir / "inbox"
        self.accepted = self.state_dir / "accepted"
        self.rejected = self.state_dir / "rejected"
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # its mode: the daemon's
        for directory in (self.inbox, self.accepted, self.rejected):
            ensure_private_dir(directory)
        self._submit = submit
        self.max_bytes = max_bytes
        self.scan_interval = scan_interval
        self._clock = clock
        self._wallclock = wallclock
        self._uid = os.geteuid()
        self._last_scan: float | None = None
        self._stuck: set[tuple[int, int]] = set()
        self._waiting: set[tuple[int, int]] = set()
        self._flag = threading.Event()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._observer: BaseObserver | None = None

    # -- signalling (any thread) -------------------------------------------------------

    def request_scan(self) -> None:
        """Ask for a scan: sets `pending()` and makes `fileno()` readable. Thread-safe."""
        self._flag.set()
        try:
            os.write(self._wake_w, b"\0")
        except (BlockingIOError, OSError):
            pass  # the pipe is full (a wake-up is already there) or closed

    def pending(self) -> bool:
        """True when an event asked for a scan since the last one started."""
        return self._flag.is_set()

    def fileno(self) -> int:
        """A descriptor that is readable while a scan is pending (for a selector)."""
        return self._wake_r

    def due(self) -> bool:
        """True when a scan is pending, none ran yet, or `scan_interval` has passed."""
        if self.pending() or self._last_scan is None:
            return True
        return self._clock() - self._last_scan >= self.scan_interval

    # -- observer ----------------------------------------------------------------------

    def start(self) -> bool:
        """Start watching the inbox; True if the observer runs.

        When it cannot start (e.g. out of inotify watches) this logs a warning and returns
        False: the periodic scan still finds every file, later. The first `poll()` scans.
        """
        if self._observer is not None:
            return True
        observer = Observer()
        observer.daemon = True
        try:
            observer.schedule(_InboxHandler(self), str(self.inbox), recursive=False)
            observer.start()
        except OSError as exc:
            log.warning("spool: cannot watch %s (%s); relying on periodic scans",
                        self.inbox, exc)
            return False
        self._observer = observer
        return True

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the observer (if running) and wait up to `timeout` seconds for its thread."""
        observer, self._observer = self._observer, None
        if observer is not None:
            observer.stop()
            observer.join(timeout)

    def close(self) -> None:
        """`stop()`, then close the wake-up pipe. The spool is unusable afterwards."""
        self.stop()
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass

    # -- scanning (the daemon's loop thread) -------------------------------------------

    def poll(self) -> list[Outcome]:
        """`scan()` if `due()`, else nothing."""
        return self.scan() if self.due() else []

    def scan(self) -> list[Outcome]:
        """Process every inbox entry now (see module docstring); return what was done."""
        self._clear_pending()
        self._last_scan = self._clock()
        try:
            names = sorted(os.listdir(self.inbox))
        except OSError as exc:
            log.error("spool: cannot list %s: %s", self.inbox, exc)
            return []
        outcomes = []
        for name in names:
            if is_ignored(name):
                continue
            outcome = self._process(name)
            if outcome is not None:
                outcomes.append(outcome)
        return outcomes

    def _clear_pending(self) -> None:
        self._flag.clear()
        try:
            while os.read(self._wake_r, 4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def _process(self, name: str) -> Outcome | None:
        """Check, submit and move one entry; None when it vanished or is stuck."""
        path = self.inbox / name
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return None
        if (st.st_dev, st.st_ino) in self._stuck | self._waiting:
            return None
        try:
            self._check(path, st)
        except FileNotFoundError:
            return None
        except _Rejection as rejection:
            return self._reject(name, st, rejection.reason)
        try:
            later = self._submit(path)
        except ValueError as exc:
            return self._reject(name, st, str(exc) or type(exc).__name__)
        except Exception as exc:  # one bad file must not stop the daemon
            log.exception("spool: submitting %s failed; left in the inbox to retry", name)
            return Outcome(name, "retry", f"{type(exc).__name__}: {exc}")
        if isinstance(later, Later):
            later.name, later.key = name, (st.st_dev, st.st_ino)
            self._waiting.add(later.key)
            return Outcome(name, "pending")
        return self._accept(name, st)

    def settle(self, later: Later, reason: str | None) -> Outcome | None:
        """Decide about a file whose `submit` returned `later`: accept it (reason None) or
        reject it for `reason`. None when it is no longer in the inbox as it was."""
        if later.name is None or later.key not in self._waiting:
            return None
        self._waiting.discard(later.key)
        try:
            st = os.lstat(self.inbox / later.name)
        except FileNotFoundError:
            return None
        if (st.st_dev, st.st_ino) != later.key:
            return None
        if reason is None:
            return self._accept(later.name, st)
        return self._reject(later.name, st, reason)

    def _accept(self, name: str, st: os.stat_result) -> Outcome:
        moved = self._move(name, st, self.accepted)
        log.info("spool: accepted %s%s", name, f" -> {moved}" if moved else "")
        return Outcome(name, "accepted", None, moved)

    def _check(self, path: Path, st: os.stat_result) -> None:
        """Raise _Rejection if the entry must be refused; FileNotFoundError if it vanished."""
        problem = stat_problem(st, self._uid, self.max_bytes)
        if problem is not None:
            raise _Rejection(problem)
        try:
            fd = os.open(path, _OPEN_FLAGS)
        except FileNotFoundError:
            raise
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise _Rejection(_FILE_KINDS[stat.S_IFLNK]) from None
            raise _Rejection(f"cannot open: {exc.strerror}") from None
        try:
            problem = stat_problem(os.fstat(fd), self._uid, self.max_bytes)
            if problem is not None:
                raise _Rejection(problem)
            data = read_at_most(fd, self.max_bytes + 1)
        except OSError as exc:
            raise _Rejection(f"cannot read: {exc.strerror}") from None
        finally:
            os.close(fd)
        if len(data) > self.max_bytes:
            raise _Rejection(f"too large: more than {self.max_bytes} bytes")
        problem = content_problem(data)
        if problem is not None:
            raise _Rejection(problem)

    def _reject(self, name: str, st: os.stat_result, reason: str) -> Outcome:
        moved = self._move(name, st, self.rejected)
        if moved is not None:
            self._write_error(moved, reason)
        log.warning("spool: rejected %s: %s", name, reason)
        return Outcome(name, "rejected", reason, moved)

    def _move(self, name: str, st: os.stat_result, directory: Path) -> Path | None:
        """Rename inbox/name (the entry itself, never a link's target) into `directory`.

        The target is `<stamp>-<name>` (`<stamp>-<n>-<name>` if taken). On failure this
        logs, remembers the entry so later scans skip it, and returns None.
        """
        target = self._free_name(directory, utc_stamp(self._wallclock()), name)
        try:
            os.rename(self.inbox / name, target)
        except OSError as exc:
            log.error("spool: cannot move %s to %s: %s", name, directory, exc)
            self._stuck.add((st.st_dev, st.st_ino))
            return None
        return target

    @staticmethod
    def _free_name(directory: Path, stamp: str, name: str) -> Path:
        target, n = directory / f"{stamp}-{name}", 0
        while os.path.lexists(target) or os.path.lexists(f"{target}.error"):
            n += 1
            target = directory / f"{stamp}-{n}-{name}"
        return target

    @staticmethod
    def _write_error(moved: Path, reason: str) -> None:
        """Write `<moved>.error` (mode 0600) by temp file and rename."""
        final = Path(f"{moved}.error")
        tmp = final.with_name(f".{final.name}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(reason.rstrip("\n") + "\n")
            os.rename(tmp, final)
        except OSError as exc:
            log.error("spool: cannot write %s: %s", final, exc)
