"""The tutorial's experiments through the daemon: what `make demo` runs.

    python examples/daemon_demo.py [--out DIR]

Starts `tuned serve` on a temporary state directory, submits the tutorial's four specs of
examples/specs/ and program.toml (a trial that is a program, not a function) with
`tunectl submit`, waits for them, prints `tunectl status` and
`tunectl best` for each, writes each experiment's curves to DIR/<experiment>.png
(default DIR: demo-output), draws the Hyperband curves and random search's best so far in
the terminal (the latter also as DIR/random_search_best_so_far.png), and stops the daemon.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SPECS = ["fifo.toml", "tutorial_hyperband.toml", "random_search.toml", "rl_simulation.toml",
         "program.toml"]
BIN = os.path.dirname(sys.executable)


def tunectl(sock: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run([os.path.join(BIN, "tunectl"), "--socket", sock, *args],
                         capture_output=True, text=True)
    if check and out.returncode != 0:
        raise SystemExit(f"tunectl {' '.join(args)} failed ({out.returncode}): {out.stderr}")
    return out


def wait_for_daemon(sock: str, daemon: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while tunectl(sock, "status", check=False).returncode != 0:
        if daemon.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("the daemon did not start; see its log above")
        time.sleep(0.1)


def wait_for_experiments(sock: str, names: list[str], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while True:
        status = json.loads(tunectl(sock, "--json", "status").stdout)
        states = {e["experiment"]: e["state"] for e in status["experiments"]}
        if all(states.get(n) in ("COMPLETED", "STOPPED", "FAILED") for n in names):
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"experiments still running after {timeout} s: {states}")
        time.sleep(0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo-output", help="folder for the curve PNGs")
    cli = parser.parse_args()
    os.makedirs(cli.out, exist_ok=True)
    root = tempfile.mkdtemp(prefix="tuned-demo-", dir="/tmp")
    state, sock = os.path.join(root, "state"), os.path.join(root, "run", "control.sock")
    print(f"== starting tuned serve (state {state})", flush=True)
    daemon = subprocess.Popen([os.path.join(BIN, "tuned"), "serve", "--state-dir", state,
                               "--socket", sock, "--log-level", "WARNING"])
    started = time.perf_counter()
    try:
        wait_for_daemon(sock, daemon)
        names = []
        for spec in SPECS:
            out = tunectl(sock, "--json", "submit", os.path.join(HERE, "specs", spec))
            names.append(json.loads(out.stdout)["experiment"])
            print(f"submitted {spec} as {names[-1]}")
        wait_for_experiments(sock, names)
        print(f"\n== all experiments done in {time.perf_counter() - started:.1f} s")
        print("\n== tunectl status")
        print(tunectl(sock, "status").stdout)
        for name in names:
            print(f"== tunectl best {name}")
            print(tunectl(sock, "best", name).stdout)
            png = os.path.join(cli.out, f"{name}.png")
            tunectl(sock, "curves", name, "--all", "--png", png)  # every trial's curve
        print(f"== curves: {', '.join(f'{n}.png' for n in names)} in {os.path.abspath(cli.out)}")
        print("\n== tunectl curves tutorial_hyperband")
        print(tunectl(sock, "curves", "tutorial_hyperband").stdout)
        png = os.path.join(cli.out, "random_search_best_so_far.png")
        print("== tunectl curves random_search --best-so-far")
        print(tunectl(sock, "curves", "random_search", "--best-so-far", "--png", png).stdout)
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=30)
        shutil.rmtree(root, ignore_errors=True)
        print("== daemon stopped")


if __name__ == "__main__":
    main()
