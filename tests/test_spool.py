"""The spool: inbox entries are accepted or rejected (with a reason), in real directories."""

from __future__ import annotations

import os
import socket
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import wait_until

from tuned.daemon.spool import Later, Outcome, Spool
from tuned.experiment.spec import SpecError

GOOD = 'name = "exp"\n'


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Submitter:
    """Records what it was given; raises SpecError for files whose text says so."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    def __call__(self, path: Path) -> None:
        text = path.read_text()
        self.seen.append((path.name, text))
        if "malformed" in text:
            raise SpecError(["searcher: unknown searcher 'nope'"])


@pytest.fixture
def submitter() -> Submitter:
    return Submitter()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def spool(tmp_path: Path, submitter: Submitter, clock: FakeClock) -> Iterator[Spool]:
    sp = Spool(tmp_path / "state", submitter, max_bytes=1024, clock=clock, scan_interval=30.0)
    yield sp
    sp.close()


def drop(spool: Spool, name: str, text: str = GOOD) -> Path:
    """Write a file the recommended way: a temp name, then rename into place."""
    tmp = spool.inbox / f".{name}.tmp"
    tmp.write_text(text)
    final = spool.inbox / name
    os.rename(tmp, final)
    return final


def one(outcomes: list[Outcome]) -> Outcome:
    assert len(outcomes) == 1, outcomes
    return outcomes[0]


def assert_rejected(spool: Spool, name: str, reason_part: str) -> None:
    outcome = one(spool.scan())
    assert outcome.status == "rejected" and outcome.name == name
    assert reason_part in (outcome.reason or "")
    assert outcome.moved_to is not None and outcome.moved_to.parent == spool.rejected
    assert outcome.moved_to.name.endswith("-" + name)
    assert not os.path.lexists(spool.inbox / name)
    error = Path(f"{outcome.moved_to}.error")
    assert reason_part in error.read_text()
    assert stat.S_IMODE(error.stat().st_mode) == 0o600


def test_directories_are_created_private(spool: Spool) -> None:
    for directory in (spool.inbox, spool.accepted, spool.rejected):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700


def test_a_valid_spec_is_submitted_and_accepted(spool: Spool, submitter: Submitter) -> None:
    drop(spool, "exp.toml")
    outcome = one(spool.scan())
    assert outcome.status == "accepted" and outcome.reason is None
    assert submitter.seen == [("exp.toml", GOOD)]
    assert outcome.moved_to is not None and outcome.moved_to.parent == spool.accepted
    assert outcome.moved_to.read_text() == GOOD
    assert os.listdir(spool.inbox) == []
    assert spool.scan() == []


def test_malformed_spec_is_rejected_with_submit_reason(spool: Spool) -> None:
    drop(spool, "bad.toml", 'malformed = true\n')
    assert_rejected(spool, "bad.toml", "searcher: unknown searcher 'nope'")


def test_huge_file_is_rejected_unread(spool: Spool, submitter: Submitter) -> None:
    drop(spool, "huge.toml", "x" * 2000)
    assert_rejected(spool, "huge.toml", "too large: 2000 bytes (limit 1024)")
    assert submitter.seen == []


@pytest.mark.parametrize("content, reason", [
    (b"name = \"a\"\x00\x01", "contains NUL bytes"),
    (b"\xff\xfe\x89PNG", "not UTF-8"),
])
def test_binary_file_is_rejected(spool: Spool, submitter: Submitter,
                                 content: bytes, reason: str) -> None:
    (spool.inbox / "blob.toml").write_bytes(content)
    assert_rejected(spool, "blob.toml", reason)
    assert submitter.seen == []


def test_symlink_is_rejected_and_moved_itself(spool: Spool, tmp_path: Path,
                                              submitter: Submitter) -> None:
    target = tmp_path / "target.toml"
    target.write_text(GOOD)
    (spool.inbox / "link.toml").symlink_to(target)
    outcome = one(spool.scan())
    assert outcome.status == "rejected" and "symbolic link" in (outcome.reason or "")
    assert outcome.moved_to is not None and outcome.moved_to.is_symlink()
    assert target.read_text() == GOOD  # the target is untouched and stays where it was
    assert submitter.seen == []


def test_directory_is_rejected_and_moved(spool: Spool) -> None:
    (spool.inbox / "subdir").mkdir()
    (spool.inbox / "subdir" / "inner.toml").write_text(GOOD)
    assert_rejected(spool, "subdir", "a directory")
    moved = next(p for p in spool.rejected.iterdir() if p.name.endswith("-subdir"))
    assert (moved / "inner.toml").read_text() == GOOD


def test_fifo_is_rejected_without_blocking(spool: Spool) -> None:
    os.mkfifo(spool.inbox / "pipe.toml")
    assert_rejected(spool, "pipe.toml", "a FIFO")


def test_socket_is_rejected(spool: Spool) -> None:
    path = spool.inbox / "sock.toml"
    if len(os.fsencode(path)) >= 100:
        pytest.skip("temp path too long for a Unix socket name")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(path))
        assert_rejected(spool, "sock.toml", "a socket")


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can chown a file to another user")
def test_file_of_another_owner_is_rejected(spool: Spool, submitter: Submitter) -> None:
    path = spool.inbox / "theirs.toml"
    path.write_text(GOOD)
    os.chown(path, 65534, 65534)
    assert_rejected(spool, "theirs.toml", "owned by uid 65534")
    assert submitter.seen == []


def test_in_progress_names_are_ignored_until_renamed(spool: Spool,
                                                     submitter: Submitter) -> None:
    for name in (".exp.toml", "exp.toml.tmp", "exp.toml~"):
        (spool.inbox / name).write_text("half a spe")
    assert spool.scan() == []
    assert submitter.seen == []
    (spool.inbox / "exp.toml.tmp").write_text(GOOD)
    os.rename(spool.inbox / "exp.toml.tmp", spool.inbox / "exp.toml")
    assert one(spool.scan()).status == "accepted"
    assert sorted(os.listdir(spool.inbox)) == [".exp.toml", "exp.toml~"]


def test_unexpected_submit_error_leaves_the_file_to_retry(tmp_path: Path) -> None:
    calls: list[str] = []

    def flaky(path: Path) -> None:
        calls.append(path.name)
        if len(calls) == 1:
            raise RuntimeError("database is locked")

    sp = Spool(tmp_path / "state", flaky)
    try:
        drop(sp, "exp.toml")
        outcome = one(sp.scan())
        assert outcome.status == "retry" and "database is locked" in (outcome.reason or "")
        assert (sp.inbox / "exp.toml").exists()
        assert one(sp.scan()).status == "accepted"
        assert calls == ["exp.toml", "exp.toml"]
    finally:
        sp.close()


def test_same_name_twice_gets_distinct_targets(tmp_path: Path, submitter: Submitter) -> None:
    sp = Spool(tmp_path / "state", submitter, wallclock=lambda: 1_700_000_000.0)
    try:
        drop(sp, "exp.toml")
        first = one(sp.scan()).moved_to
        drop(sp, "exp.toml")
        second = one(sp.scan()).moved_to
        assert first is not None and second is not None and first != second
        assert first.name == "20231114T221320.000000Z-exp.toml"
        assert second.name == "20231114T221320.000000Z-1-exp.toml"
    finally:
        sp.close()


def test_periodic_scan_finds_files_without_the_observer(spool: Spool, clock: FakeClock,
                                                        submitter: Submitter) -> None:
    assert spool.due()  # never scanned
    assert spool.poll() == []
    drop(spool, "exp.toml")  # no observer running: nobody signals this file
    assert not spool.pending() and not spool.due()
    assert spool.poll() == []
    clock.now += 30.0
    assert spool.due()
    assert one(spool.poll()).status == "accepted"
    assert submitter.seen == [("exp.toml", GOOD)]


@pytest.mark.parametrize("write", ["rename", "in place"])
def test_observer_makes_a_scan_pending(spool: Spool, submitter: Submitter, write: str) -> None:
    assert spool.start()
    try:
        spool.scan()  # the startup scan
        assert not spool.pending()
        if write == "rename":
            drop(spool, "exp.toml")
        else:
            (spool.inbox / "exp.toml").write_text(GOOD)
        assert wait_until(spool.pending)
        assert os.read(spool.fileno(), 1)  # the selector-facing descriptor is readable
        assert submitter.seen == []  # the watchdog thread never submits
        assert one(spool.poll()).status == "accepted"
        assert not spool.pending()
    finally:
        spool.stop()


def test_observer_ignores_temp_files(spool: Spool) -> None:
    assert spool.start()
    try:
        (spool.inbox / "exp.toml.tmp").write_text(GOOD)
        (spool.inbox / ".hidden").write_text(GOOD)
        time.sleep(0.2)
        assert not spool.pending()
    finally:
        spool.stop()


def test_a_later_decision_keeps_the_file_in_the_inbox_until_settled(tmp_path: Path) -> None:
    laters: list[Later] = []

    def submit(path: Path) -> Later:
        laters.append(Later())
        return laters[-1]

    sp = Spool(tmp_path / "state", submit, clock=FakeClock())
    try:
        drop(sp, "slow.toml")
        drop(sp, "bad.toml")
        assert [o.status for o in sp.scan()] == ["pending", "pending"]
        assert sp.scan() == []  # waiting files are not submitted twice
        assert len(laters) == 2 and (sp.inbox / "slow.toml").exists()
        rejected = sp.settle(laters[0], "entry: import failed")
        accepted = sp.settle(laters[1], None)
        assert (rejected.name, rejected.status) == ("bad.toml", "rejected")
        assert (accepted.name, accepted.status) == ("slow.toml", "accepted")
        assert rejected.moved_to.with_name(rejected.moved_to.name + ".error").read_text() \
            == "entry: import failed\n"
        assert sp.settle(laters[1], None) is None  # settled once only
        assert os.listdir(sp.inbox) == []
    finally:
        sp.close()
