"""The systemd units: the settings the daemon relies on, and `systemd-analyze verify`.

`verify` checks that ExecStart= names an executable that exists. The units say
`/usr/bin/env tuned serve`; the copies verified here point at this environment's `tuned`
script instead, so the check does not depend on what is installed system-wide. The test
skips only when systemd-analyze itself is not installed. The user unit is verified in
`--user` mode (with a private XDG_RUNTIME_DIR); where a user manager cannot be set up at
all, it is verified as a system unit instead.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNITS = {"tuned.service": ROOT / "systemd" / "tuned.service",
         "tuned-user.service": ROOT / "systemd" / "tuned-user.service"}
EXEC_START = "ExecStart=/usr/bin/env tuned serve"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


def settings(text: str) -> dict[str, list[str]]:
    """Key -> values of a unit file (comments and section headers left out)."""
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        found.setdefault(key.strip(), []).append(value.strip())
    return found


@pytest.mark.parametrize("name", sorted(UNITS))
def test_unit_has_the_settings_the_daemon_relies_on(name: str) -> None:
    conf = settings(UNITS[name].read_text())
    assert conf["Type"] == ["notify"]
    assert conf["NotifyAccess"] == ["main"]
    assert conf["KillMode"] == ["process"]
    assert conf["Restart"] == ["on-failure"]
    assert re.fullmatch(r"\d+", conf["WatchdogSec"][0])
    assert conf["StateDirectory"] == ["tuned"]
    assert conf["RuntimeDirectory"] == ["tuned"]
    assert conf["RuntimeDirectoryPreserve"] == ["yes"]
    assert conf["ExecStart"] == [EXEC_START.partition("=")[2]]
    assert "TimeoutStopSec" in conf
    assert "PrivateTmp" not in conf  # deleted on every restart, under the surviving trials


def test_unit_targets() -> None:
    assert settings(UNITS["tuned.service"].read_text())["WantedBy"] == ["multi-user.target"]
    assert settings(UNITS["tuned-user.service"].read_text())["WantedBy"] == ["default.target"]


def tuned_executable() -> str:
    """This environment's `tuned` console script (falls back to the interpreter)."""
    candidate = Path(sys.executable).parent / "tuned"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which("tuned")
    return found or sys.executable


def local_copy(name: str, directory: Path) -> Path:
    """A copy of unit `name` in `directory` whose ExecStart= names an existing executable."""
    text = UNITS[name].read_text()
    assert EXEC_START in text
    copy = directory / name
    copy.write_text(text.replace(EXEC_START, f"ExecStart={tuned_executable()} serve"))
    return copy


def verify(unit: Path, *, user: bool, runtime_dir: Path) -> subprocess.CompletedProcess[str]:
    assert SYSTEMD_ANALYZE is not None
    argv = [SYSTEMD_ANALYZE] + (["--user"] if user else []) + ["--man=no", "verify", str(unit)]
    env = dict(os.environ, XDG_RUNTIME_DIR=str(runtime_dir), SYSTEMD_PAGER="", LC_ALL="C")
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60,
                          cwd=unit.parent, check=False)


def assert_clean(result: subprocess.CompletedProcess[str], unit: Path) -> None:
    """rc 0 and no diagnostic about our unit (unknown keys are only warnings for verify)."""
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    ours = [line for line in output.splitlines()
            if unit.name in line or str(unit) in line or "Unknown" in line]
    assert not ours, output


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")
def test_system_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    unit = local_copy("tuned.service", tmp_path)
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    assert_clean(verify(unit, user=False, runtime_dir=runtime), unit)


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")
def test_user_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    unit = local_copy("tuned-user.service", tmp_path)
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    result = verify(unit, user=True, runtime_dir=runtime)
    if "Failed to initialize manager" in result.stderr:
        # No user manager can be set up here: check the file as a system unit instead.
        result = verify(unit, user=False, runtime_dir=runtime)
    assert_clean(result, unit)
