"""A tutorial experiment run as its own process, for the kill-and-resume tests.

    python tutorial_run.py CHECKPOINT SCHEDULER NUM_TRIALS SLOTS RESUME(0|1) [SLEEP]
"""

import sys
import time

import numpy as np

import tuned as ag

checkpoint, kind, num_trials, slots, resume = sys.argv[1:6]
pause = float(sys.argv[6]) if len(sys.argv) > 6 else 0.0


@ag.args(lr=ag.space.Real(1e-3, 1e-2, log=True), wd=ag.space.Real(1e-3, 1e-2), epochs=10)
def train_fn(args, reporter):
    for e in range(args.epochs):
        time.sleep(pause)
        acc = 1 - np.power(1.8, -np.random.uniform(e, 2 * e))
        reporter(epoch=e + 1, accuracy=acc, lr=args.lr, wd=args.wd)


cls = {"fifo": ag.scheduler.FIFOScheduler, "hyperband": ag.scheduler.HyperbandScheduler}[kind]
scheduler = cls(train_fn, resource={"num_cpus": 1, "num_gpus": 0}, num_trials=int(num_trials),
                reward_attr="accuracy", time_attr="epoch", checkpoint=checkpoint,
                resume=resume == "1", seed=7, max_concurrent=int(slots))
scheduler.run()
scheduler.join_jobs()
print("best", scheduler.get_best_config(), scheduler.get_best_reward(), flush=True)
