"""A trial as a standalone program, for a spec with `command = [...]` (see
examples/specs/program.toml): it reads its arguments with `tuned.report.config()` (the
learning rate also arrives on its command line) and reports once per epoch.

The "training" is a noisy quadratic bowl whose best learning rate is 0.01 (log scale), so
that a search has something to find."""

import argparse
import math
import random
import time

import tuned.report as report


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lr", type=float, required=True)
    lr = parser.parse_args().lr
    args = report.config()
    rng = random.Random(report.seed())
    distance = abs(math.log10(lr) + 2)  # 0 at lr = 0.01
    for epoch in range(1, args["epochs"] + 1):
        time.sleep(args["seconds_per_epoch"])
        progress = 1 - math.exp(-epoch / 3)
        accuracy = progress * (1 - 0.3 * distance) + rng.gauss(0, 0.01)
        report.report(epoch=epoch, accuracy=accuracy)


if __name__ == "__main__":
    main()
