"""Real-GPU check: NVML discovery, and GPUs handed to trials in CUDA_VISIBLE_DEVICES.

    python benchmarks/gpu_check.py [--trials 4] [--torch]

Runs on a machine with NVIDIA GPUs (it says so and exits 0 on one without). Prints the GPUs
NVML finds, then runs a FIFO experiment with `num_gpus=1` per trial; each trial reports the
CUDA_VISIBLE_DEVICES it got and (with --torch) the UUID of the one device PyTorch then sees.
Checks: every trial saw exactly one GPU, a UUID NVML listed, and (with --torch) the same one
CUDA shows it; prints the trials' launch overhead.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import tuned as ag
from tuned.executors.gpus import discover_gpus


@ag.args(x=ag.space.Real(0, 1), use_torch=False)
def gpu_trial(args, reporter):
    started = time.time()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    seen_uuid, count = "", -1
    if args.use_torch:
        import torch

        count = torch.cuda.device_count()
        if count:
            seen_uuid = "GPU-" + str(torch.cuda.get_device_properties(0).uuid)
            x = torch.ones(1024, device="cuda")
            assert float(x.sum()) == 1024.0
    reporter(accuracy=args.x, visible=visible, torch_uuid=seen_uuid, torch_count=count,
             started=started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--torch", action="store_true", help="also ask PyTorch what it sees")
    cli = parser.parse_args()

    gpus = discover_gpus()
    print(f"NVML found {len(gpus)} GPU(s)")
    for g in gpus:
        print(f"  {g.index}: {g.uuid} {g.name} {g.memory_total / 2**30:.1f} GiB")
    if not gpus:
        print("no GPU here: nothing to check")
        return 0
    uuids = {g.uuid for g in gpus}
    with tempfile.TemporaryDirectory() as d:
        gpu_trial.constants["use_torch"] = cli.torch
        s = ag.scheduler.FIFOScheduler(gpu_trial, resource={"num_cpus": 1, "num_gpus": 1},
                                       num_trials=cli.trials, time_attr=None,
                                       checkpoint=os.path.join(d, "t.db"), seed=0)
        t0 = time.time()
        s.run()
        wall = time.time() - t0
        reports = [h[0] if h else {} for h in s.training_history.values()]
        states = [(t.number, t.state, t.error) for t in s.trials()]
    ok = True
    for (number, state, error), r in zip(states, reports, strict=True):
        visible = r.get("visible", "")
        line = f"  trial {number}: {state} CUDA_VISIBLE_DEVICES={visible}"
        good = state == "COMPLETED" and visible in uuids
        if cli.torch:
            line += f" torch sees {r.get('torch_count')} device(s): {r.get('torch_uuid')}"
            good = good and r.get("torch_count") == 1 and r.get("torch_uuid") == visible
        if error:
            line += f" error: {error}"
        print(line + ("" if good else "   <-- WRONG"))
        ok = ok and good
    print(f"{cli.trials} trials in {wall:.2f} s")
    print("GPU CHECK", "PASSED" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
