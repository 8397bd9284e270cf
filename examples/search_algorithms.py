"""AutoGluon's "Search Algorithms" tutorial as a script, run by tuned.

The code is the tutorial's, with two changes: `import tuned as ag` instead of
`import autogluon.core as ag`, and figures saved to PNG files instead of shown (plus
`fig.add_subplot(projection='3d')`, the spelling of current matplotlib).

    python examples/search_algorithms.py [--out DIR]

writes its figures and the experiments' database (DIR/tuned-runs/tuned.db) under DIR
(default: demo-output).
"""

import argparse
import os
import time

import matplotlib

matplotlib.use("Agg")

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--out", default="demo-output", help="folder for figures and database")
cli = parser.parse_args()
os.makedirs(cli.out, exist_ok=True)
os.chdir(cli.out)
started = time.perf_counter()


def section(title):
    print(f"\n== {title} ({time.perf_counter() - started:.1f} s)", flush=True)


# --- the tutorial --------------------------------------------------------------------------

import numpy as np  # noqa: E402

import tuned as ag  # noqa: E402


@ag.args(
    lr=ag.space.Real(1e-3, 1e-2, log=True),
    wd=ag.space.Real(1e-3, 1e-2),
    epochs=10)
def train_fn(args, reporter):
    for e in range(args.epochs):
        dummy_accuracy = 1 - np.power(1.8, -np.random.uniform(e, 2*e))
        reporter(epoch=e+1, accuracy=dummy_accuracy, lr=args.lr, wd=args.wd)


section("FIFO scheduler: 20 trials of 10 epochs")
scheduler = ag.scheduler.FIFOScheduler(train_fn,
                                       resource={'num_cpus': 2, 'num_gpus': 0},
                                       num_trials=20,
                                       reward_attr='accuracy',
                                       time_attr='epoch')
scheduler.run()
scheduler.join_jobs()
scheduler.get_training_curves(filename="fifo_curves.png", use_legend=False)
print('Best config: {}, best reward: {}'.format(scheduler.get_best_config(),
                                               scheduler.get_best_reward()))

section("Hyperband scheduler (stopping): 100 trials")
scheduler = ag.scheduler.HyperbandScheduler(train_fn,
                                            resource={'num_cpus': 2, 'num_gpus': 0},
                                            num_trials=100,
                                            reward_attr='accuracy',
                                            time_attr='epoch',
                                            grace_period=1,
                                            reduction_factor=3,
                                            type='stopping')
scheduler.run()
scheduler.join_jobs()
scheduler.get_training_curves(filename="hyperband_curves.png", use_legend=False)
epochs_run = [len(v) for v in scheduler.training_history.values()]
print('Best config: {}, best reward: {}'.format(scheduler.get_best_config(),
                                               scheduler.get_best_reward()))
print('Trials by epochs run:', {e: epochs_run.count(e) for e in sorted(set(epochs_run))})

import matplotlib.pyplot as plt  # noqa: E402
from mpl_toolkits.mplot3d import Axes3D  # noqa: E402, F401


def gaussian2d(x, y, x0, y0, xalpha, yalpha, A):
    return A * np.exp( -((x-x0)/xalpha)**2 -((y-y0)/yalpha)**2)


x, y = np.linspace(0, 99, 100), np.linspace(0, 99, 100)
X, Y = np.meshgrid(x, y)

Z = np.zeros(X.shape)
ps = [(20, 70, 35, 40, 1),
      (80, 40, 20, 20, 0.7)]
for p in ps:
    Z += gaussian2d(X, Y, *p)

fig = plt.figure()
ax = fig.add_subplot(projection='3d')
ax.plot_surface(X, Y, Z, cmap='plasma')
ax.set_zlim(0,np.max(Z)+2)
plt.savefig("reward_surface.png")
plt.close(fig)


@ag.args(
    x=ag.space.Categorical(*list(range(100))),
    y=ag.space.Categorical(*list(range(100))),
)
def rl_simulation(args, reporter):
    x, y = args.x, args.y
    reporter(accuracy=Z[y][x])


section("Random search: 300 trials")
random_scheduler = ag.scheduler.FIFOScheduler(rl_simulation,
                                              resource={'num_cpus': 1, 'num_gpus': 0},
                                              num_trials=300,
                                              reward_attr="accuracy",
                                              resume=False)
random_scheduler.run()
random_scheduler.join_jobs()
print('Best config: {}, best reward: {}'.format(random_scheduler.get_best_config(), random_scheduler.get_best_reward()))  # noqa: E501

section("Reinforcement learning: 300 trials")
rl_scheduler = ag.scheduler.RLScheduler(rl_simulation,
                                        resource={'num_cpus': 1, 'num_gpus': 0},
                                        num_trials=300,
                                        reward_attr="accuracy",
                                        controller_batch_size=4,
                                        controller_lr=5e-3)
rl_scheduler.run()
rl_scheduler.join_jobs()
print('Best config: {}, best reward: {}'.format(rl_scheduler.get_best_config(), rl_scheduler.get_best_reward()))  # noqa: E501

section("Compare")
results_rl = [v[0]['accuracy'] for v in rl_scheduler.training_history.values()]
results_random = [v[0]['accuracy'] for v in random_scheduler.training_history.values()]

import statistics  # noqa: E402

results1 = [statistics.mean(results_random[i:i+10]) for i in range(0, len(results_random), 10)]
results2 = [statistics.mean(results_rl[i:i+10]) for i in range(0, len(results_rl), 10)]

plt.figure()
plt.plot(range(len(results1)), results1, range(len(results2)), results2)
plt.legend(["random", "RL"])
plt.xlabel("trials (x10)")
plt.ylabel("mean accuracy of 10 trials")
plt.savefig("random_vs_rl.png")

# --- summary -------------------------------------------------------------------------------

section("Done")
print(f"mean accuracy of the last 100 trials: random {statistics.mean(results_random[-100:]):.3f}, "
      f"RL {statistics.mean(results_rl[-100:]):.3f}")
print(f"figures: {', '.join(sorted(f for f in os.listdir('.') if f.endswith('.png')))} "
      f"in {os.getcwd()}")
print(f"experiments: {os.path.join(os.getcwd(), ag.scheduler.DEFAULT_CHECKPOINT)}")
