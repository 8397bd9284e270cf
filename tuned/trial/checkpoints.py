"""A trial's checkpoints: atomic, checksummed files in the trial's own directory.

Layout of a trial's directory (one per trial, kept across its attempts)::

    ckpt-<seq>.json          the commit record: {"v", "seq", "kind", "data", "size", "sha256"}
    ckpt-<seq>.<token>.data  the bytes it describes

`seq` is the number of reports the trial had sent when it saved: a trial resumed from the
checkpoint numbers its next report `seq + 1` (docs/architecture.md, invariant 2 keeps reports resent
from there exactly-once). Writing (docs/architecture.md, invariant 4): the data goes to a temp file,
fsynced, renamed to its unique name; then the record likewise; then the directory is
fsynced. The record is the commit point: a process killed at any instant leaves either the
new checkpoint committed or the previous one still the latest, never a torn one. `latest()`
returns the newest checkpoint whose data has its recorded size and SHA-256, so a damaged one
(a disk that lied, a hand-edited file) is passed over for the one before.

`kind` says how the bytes were made: "json" (`save` of a JSON-serialisable object), "bytes"
or "file" (the caller's own format, e.g. a framework's state dict).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

_RECORD = re.compile(r"^ckpt-(\d+)\.json$")
KINDS = ("json", "bytes", "file")
# Checkpoints a trial keeps: the latest and one before it, in case the latest is damaged.
KEEP_PER_TRIAL = 2


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written, or read back as the kind asked for."""


@dataclass(frozen=True)
class Checkpoint:
    """One committed checkpoint; `path` is its data file."""

    seq: int
    kind: str
    path: str
    size: int
    sha256: str

    def read_bytes(self) -> bytes:
        """The data, checked against the record; CheckpointError if it changed since."""
        with open(self.path, "rb") as f:
            data = f.read()
        if len(data) != self.size or hashlib.sha256(data).hexdigest() != self.sha256:
            raise CheckpointError(f"{self.path}: does not match its checksum")
        return data

    def load(self) -> Any:
        """The object a "json" checkpoint holds; CheckpointError for another kind."""
        if self.kind != "json":
            raise CheckpointError(f"checkpoint {self.seq} holds {self.kind}, not a JSON object: "
                                  "read it with read_bytes() or its path")
        return json.loads(self.read_bytes())


class TrialCheckpoints:
    """The checkpoints of one trial, in `directory` (created on first save)."""

    def __init__(self, directory: str):
        self.directory = directory
        self.last_saved: Checkpoint | None = None

    # -- writing -------------------------------------------------------------------------

    def save(self, obj: Any, seq: int) -> Checkpoint:
        """Commit a JSON-serialisable object (numpy values and arrays allowed)."""
        try:
            data = json.dumps(obj, default=_json_default, separators=(",", ":")).encode()
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"save_checkpoint: {exc}; save bytes or a file instead "
                                  "(save_checkpoint_bytes, checkpoint_file)") from None
        return self.save_bytes(data, seq, kind="json")

    def save_bytes(self, data: bytes, seq: int, kind: str = "bytes") -> Checkpoint:
        """Commit `data` as the checkpoint at `seq`."""
        with self.writing(seq, kind) as path, open(path, "wb") as f:
            f.write(data)
        assert self.last_saved is not None
        return self.last_saved

    @contextlib.contextmanager
    def writing(self, seq: int, kind: str = "file") -> Iterator[str]:
        """Give a temp path to write the data into; commit it when the block ends without an
        exception (the file is fsynced, checksummed and renamed, then its record), discard it
        otherwise."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        os.makedirs(self.directory, exist_ok=True)
        token = secrets.token_hex(6)
        tmp = os.path.join(self.directory, f".ckpt-{seq}.{token}.tmp")
        try:
            yield tmp
            if not os.path.isfile(tmp):
                raise CheckpointError(f"nothing was written to {tmp}")
            size, digest = _fsync_and_hash(tmp)
            data_name = f"ckpt-{seq}.{token}.data"
            os.rename(tmp, os.path.join(self.directory, data_name))
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        record = {"v": 1, "seq": seq, "kind": kind, "data": data_name, "size": size,
                  "sha256": digest}
        _write_durably(os.path.join(self.directory, f"ckpt-{seq}.json"),
                       json.dumps(record).encode())
        _fsync_dir(self.directory)
        self.last_saved = Checkpoint(seq, kind, os.path.join(self.directory, data_name), size,
                                     digest)
        self.prune(KEEP_PER_TRIAL)

    # -- reading -------------------------------------------------------------------------

    def latest(self) -> Checkpoint | None:
        """The newest committed checkpoint whose data matches its record, or None."""
        for seq in sorted(self._seqs(), reverse=True):
            checkpoint = self._read_record(seq)
            if checkpoint is not None and _matches(checkpoint):
                return checkpoint
        return None

    def _seqs(self) -> list[int]:
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        return [int(m.group(1)) for n in names if (m := _RECORD.match(n))]

    def _read_record(self, seq: int) -> Checkpoint | None:
        try:
            with open(os.path.join(self.directory, f"ckpt-{seq}.json"), "rb") as f:
                record = json.loads(f.read())
            data = os.path.join(self.directory, os.path.basename(record["data"]))
            return Checkpoint(int(record["seq"]), str(record["kind"]), data,
                              int(record["size"]), str(record["sha256"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    # -- removing ------------------------------------------------------------------------

    def prune(self, keep: int) -> None:
        """Keep the `keep` newest records and their data; remove the rest, data files no
        kept record names, and temp files (left by a writer killed midway; the trial's only
        writer is not writing while it prunes)."""
        seqs = sorted(self._seqs(), reverse=True)
        kept = {c.path for s in seqs[:keep] if (c := self._read_record(s)) is not None}
        for seq in seqs[keep:]:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.directory, f"ckpt-{seq}.json"))
        for name in os.listdir(self.directory):
            path = os.path.join(self.directory, name)
            if (name.endswith(".data") and path not in kept) or name.endswith(".tmp"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)

    def copy_latest_to(self, other: TrialCheckpoints) -> Checkpoint | None:
        """Commit this trial's latest good checkpoint into `other` (a trial that starts from
        it), same seq and kind; None when there is none."""
        latest = self.latest()
        if latest is None:
            return None
        return other.save_bytes(latest.read_bytes(), latest.seq, kind=latest.kind)

    def remove(self) -> None:
        """Delete the trial's directory and everything in it."""
        shutil.rmtree(self.directory, ignore_errors=True)


def _matches(checkpoint: Checkpoint) -> bool:
    try:
        checkpoint.read_bytes()
    except (OSError, CheckpointError):
        return False
    return True


def _fsync_and_hash(path: str) -> tuple[int, str]:
    digest, size = hashlib.sha256(), 0
    with open(path, "rb+") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
            size += len(block)
        os.fsync(f.fileno())
    return size, digest.hexdigest()


def _write_durably(path: str, data: bytes) -> None:
    tmp = f"{path}.{secrets.token_hex(4)}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")
