"""Trial checkpoints: atomic, checksummed, the latest good one wins (docs/architecture.md,
invariant 4)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tuned.trial.checkpoints import CheckpointError, TrialCheckpoints


def test_json_bytes_and_file_checkpoints_round_trip(tmp_path):
    ckpts = TrialCheckpoints(str(tmp_path / "t"))
    assert ckpts.latest() is None
    ckpts.save({"epoch": 3, "w": np.arange(3.0), "lr": np.float32(0.5)}, seq=3)
    assert ckpts.latest().load() == {"epoch": 3, "w": [0.0, 1.0, 2.0], "lr": 0.5}
    ckpts.save_bytes(b"\x00raw", seq=4)
    assert (ckpts.latest().seq, ckpts.latest().read_bytes()) == (4, b"\x00raw")
    with pytest.raises(CheckpointError, match="holds bytes"):
        ckpts.latest().load()
    with ckpts.writing(seq=5) as path, open(path, "wb") as f:
        f.write(b"framework state")
    latest = ckpts.latest()
    assert (latest.seq, latest.kind, open(latest.path, "rb").read()) == (
        5, "file", b"framework state")
    with pytest.raises(CheckpointError, match="JSON"):
        ckpts.save({"x": object()}, seq=6)


def test_only_the_last_two_are_kept_and_a_failed_write_leaves_nothing(tmp_path):
    ckpts = TrialCheckpoints(str(tmp_path / "t"))
    for seq in range(1, 6):
        ckpts.save({"seq": seq}, seq)
    with pytest.raises(RuntimeError), ckpts.writing(seq=9) as path:
        open(path, "wb").write(b"half")
        raise RuntimeError("the framework failed")
    names = sorted(os.listdir(ckpts.directory))
    assert [n for n in names if n.endswith(".json")] == ["ckpt-4.json", "ckpt-5.json"]
    assert len([n for n in names if n.endswith(".data")]) == 2 and len(names) == 4
    assert ckpts.latest().load() == {"seq": 5}


def test_a_damaged_latest_checkpoint_is_passed_over(tmp_path):
    ckpts = TrialCheckpoints(str(tmp_path / "t"))
    ckpts.save({"epoch": 1}, 1)
    damaged = ckpts.save({"epoch": 2}, 2)
    with open(damaged.path, "r+b") as f:
        f.write(b"X")
    assert ckpts.latest().load() == {"epoch": 1}
    os.unlink(ckpts._read_record(1).path)  # its data gone too: nothing usable
    assert ckpts.latest() is None


@pytest.mark.parametrize("moment", ["while writing the data", "before the record"])
def test_a_trial_killed_in_the_middle_of_a_write_leaves_the_previous_one(tmp_path, moment):
    directory = tmp_path / "t"
    script = textwrap.dedent(f"""
        import os, signal
        import tuned.trial.checkpoints as c

        ckpts = c.TrialCheckpoints({str(directory)!r})
        ckpts.save({{"epoch": 1}}, 1)
        if {moment!r} == "before the record":
            c._write_durably = lambda path, data: os.kill(os.getpid(), signal.SIGKILL)
            ckpts.save({{"epoch": 2}}, 2)
        with ckpts.writing(2) as path:
            with open(path, "wb") as f:
                f.write(b"x" * (1 << 20))
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    ckpts = TrialCheckpoints(str(directory))
    assert ckpts.latest().load() == {"epoch": 1}
    ckpts.save({"epoch": 2}, 2)  # the leftovers are cleaned on the next save
    assert not [n for n in os.listdir(directory) if n.endswith(".tmp")]
    assert ckpts.latest().load() == {"epoch": 2}
