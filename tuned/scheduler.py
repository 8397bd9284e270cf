"""The in-process API of AutoGluon's scheduler system, on tuned's engine and store.

    scheduler = tuned.scheduler.FIFOScheduler(train_fn, resource={'num_cpus': 2, 'num_gpus': 0},
                                              num_trials=20, reward_attr='accuracy',
                                              time_attr='epoch')
    scheduler.run()
    scheduler.join_jobs()
    scheduler.get_best_config(), scheduler.get_best_reward()

Every experiment is stored in the SQLite file `checkpoint`; `resume=True` with the same file
continues the last experiment of the same name where it stopped.
"""

from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Callable
from typing import Any

from tuned.core.args import Args
from tuned.core.factory import infer_max_t, max_t_problem
from tuned.core.lifecycle import DEFAULT_MAX_FAILURES, ExperimentFailed
from tuned.daemon.paths import DEFAULT_CHECKPOINT
from tuned.engine.engine import Engine
from tuned.engine.resources import ResourcePool
from tuned.executors.gpus import discover_gpus
from tuned.executors.host import available_cpus
from tuned.executors.template import ForkServerExecutor
from tuned.experiment.spec import ExperimentSpec, json_safe
from tuned.store.database import NotFound, Store
from tuned.trial.worker import make_runner

__all__ = ["FIFOScheduler", "HyperbandScheduler", "PBTScheduler", "RLScheduler",
           "DEFAULT_CHECKPOINT"]

log = logging.getLogger("tuned.scheduler")



class FIFOScheduler:
    """Runs `num_trials` trials (or as many as fit in `time_out` seconds), as many at once as
    `resource` allows on this machine, each to its end.

    Raises ValueError naming the argument at fault (a bad search space, an unknown searcher,
    a resource this machine cannot give).
    """

    _scheduler = "fifo"

    def __init__(self, train_fn: Callable, resource: dict[str, Any] | None = None,
                 num_trials: int | None = None, time_out: float | None = None,
                 reward_attr: str = "accuracy", time_attr: str | None = "epoch",
                 searcher: str = "random", search_options: dict[str, Any] | None = None,
                 checkpoint: str | None = DEFAULT_CHECKPOINT, resume: bool = False,
                 mode: str = "max", seed: int | None = None, name: str | None = None,
                 max_concurrent: int | None = None, max_retries: int = 0,
                 max_failures: int = DEFAULT_MAX_FAILURES, report_lag: float = 0.0,
                 **scheduler_options: Any):
        if not callable(train_fn):
            raise ValueError(f"train_fn: expected a function, got {train_fn!r}")
        self.train_fn = train_fn
        resource = dict(resource or {})
        unknown = set(resource) - {"num_cpus", "num_gpus"}
        if unknown:
            raise ValueError(f"resource: unknown key(s) {sorted(unknown)}; "
                             "use num_cpus and num_gpus")
        space = getattr(train_fn, "space", None)
        if space is None:
            raise ValueError("train_fn: decorate it with @tuned.args(...) to give its "
                             "search space")
        seed = int.from_bytes(os.urandom(4), "little") if seed is None else seed
        options = self._scheduler_options(train_fn, scheduler_options)
        spec_data = {
            "name": name or getattr(train_fn, "__name__", "experiment"),
            "space": space,
            "constants": json_safe(getattr(train_fn, "constants", {})),
            "searcher": searcher,
            "searcher_options": dict(search_options or {}),
            "scheduler": self._scheduler,
            "scheduler_options": options,
            "num_trials": num_trials,
            "time_out": time_out,
            "reward_attr": reward_attr,
            "time_attr": time_attr,
            "mode": mode,
            "seed": seed,
            "num_cpus": resource.get("num_cpus", 1),
            "num_gpus": resource.get("num_gpus", 0),
            "max_concurrent": max_concurrent,
            "max_retries": max_retries,
            "max_failures": max_failures,
            "report_lag": report_lag,
        }
        self.spec = ExperimentSpec.from_dict(spec_data)
        self._check_resources()
        self.checkpoint = checkpoint or DEFAULT_CHECKPOINT
        self._executor = self._fork_server(train_fn)
        weakref.finalize(self, self._executor.close_template)
        try:
            self.store = Store(self.checkpoint)
            self.experiment = self._open_experiment(resume)
        except BaseException:
            self._executor.close_template()
            raise
        self.spec = ExperimentSpec.from_dict(self.experiment.spec)
        self.log_dir = os.path.join(os.path.dirname(os.path.abspath(self.checkpoint)), "logs",
                                    self.experiment.name)
        self._engine: Engine | None = None

    # -- construction helpers ------------------------------------------------------------

    @staticmethod
    def _fork_server(train_fn: Callable) -> ForkServerExecutor:
        """The executor of `run()`, its fork server forked now: before the store is opened
        (and its migrations' modules imported), this process is smaller, and so is every
        trial's fork. The server ends with `run()` (or when this object is collected, or
        this process dies); a later `run()` forks a new one."""
        executor = ForkServerExecutor(make_runner(train_fn, getattr(train_fn, "constants", {})))
        executor.start_server()
        return executor

    def _scheduler_options(self, train_fn: Callable, options: dict[str, Any]) -> dict[str, Any]:
        if options:
            raise TypeError(f"{type(self).__name__} got unexpected argument(s) "
                            f"{sorted(options)}")
        return {}

    def _check_resources(self) -> None:
        cpus = available_cpus()
        if self.spec.num_cpus > cpus:
            raise ValueError(f"resource: num_cpus={self.spec.num_cpus} per trial, but this "
                             f"machine has {cpus} CPU(s)")
        if self.spec.num_gpus > 0:
            found = len(discover_gpus())
            if self.spec.num_gpus > found:
                raise ValueError(f"resource: num_gpus={self.spec.num_gpus} per trial, but "
                                 f"{found} GPU(s) were found on this machine")

    def _open_experiment(self, resume: bool):
        """The experiment to run: with `resume`, the newest one of the same name, scheduler
        and searcher, with this run's budget (a FAILED one is not resumed: a new one
        starts), else a new one under a name not taken yet."""
        spec = self.spec.to_dict()
        if resume:
            try:
                experiment = self.store.experiment(self._latest_name(spec))
            except NotFound:
                log.info("nothing to resume in %s; starting %s", self.checkpoint, spec["name"])
            else:
                if experiment.state == "FAILED":
                    log.warning("experiment %s FAILED (%s); starting a new one",
                                experiment.name, experiment.reason)
                else:
                    return self._resumed(experiment, spec)
        spec["name"] = self.store.unique_name(spec["name"])
        return self.store.create_experiment(spec["name"], spec)

    def _resumed(self, experiment, spec: dict[str, Any]):
        """`experiment` with this run's budget, RUNNING again."""
        self._check_same_space(experiment.spec)
        budget = {"num_trials": spec["num_trials"], "time_out": spec["time_out"],
                  "max_failures": spec["max_failures"]}
        with self.store.transaction():
            experiment = self.store.update_spec(experiment.id, {**experiment.spec, **budget})
            self.store.set_experiment_state(experiment.id, "RUNNING")
        return self.store.experiment(experiment.id)

    def _latest_name(self, spec: dict[str, Any]) -> str:
        """The newest experiment of this name (or its -2, -3, ... variants) run by the same
        scheduler and searcher."""
        base = spec["name"]
        names = [e.name for e in self.store.experiments()
                 if (e.name == base or e.name.startswith(base + "-"))
                 and e.spec.get("scheduler") == spec["scheduler"]
                 and e.spec.get("searcher") == spec["searcher"]]
        if not names:
            raise NotFound(base)
        return names[-1]

    def _check_same_space(self, stored: dict[str, Any]) -> None:
        if stored["space"] != self.spec.space.to_json():
            raise ValueError(f"resume: experiment {stored['name']!r} in {self.checkpoint} "
                             "has another search space; use resume=False or another "
                             "checkpoint file")

    # -- running -------------------------------------------------------------------------

    @property
    def slots(self) -> int:
        """How many trials run at once."""
        by_cpu = max(1, int(available_cpus() // self.spec.num_cpus))
        if self.spec.max_concurrent is not None:
            return min(by_cpu, self.spec.max_concurrent)
        return by_cpu

    def _resources(self) -> ResourcePool:
        """The CPUs and GPUs this run's trials take from: `slots` trials' worth of CPUs, the
        GPUs NVML finds (when the trials want some)."""
        gpus = [g.uuid for g in discover_gpus()] if self.spec.num_gpus else []
        return ResourcePool(self.slots * self.spec.num_cpus, gpus)

    def run(self) -> None:
        """Run the experiment until every trial has ended (or `time_out` stopped new ones).

        Raises ExperimentFailed (naming the last trials' errors) when it ends FAILED: every
        trial failed, or `max_failures` did before any succeeded."""
        from tuned.ui.progress import progress_bar

        done = sum(n for s, n in self.store.count_trials(self.experiment.id).items()
                   if s in ("COMPLETED", "STOPPED", "FAILED"))
        self._executor.spares = self.slots
        with progress_bar(self.spec.num_trials, done) as bar:
            self._engine = Engine(self.store, self.experiment, self.spec, self._executor,
                                  self._resources(), self.log_dir, self.slots,
                                  on_trial_end=lambda number, state: bar.update(1))
            self._engine.run()
        self.experiment = self.store.experiment(self.experiment.id)
        if self.experiment.state == "FAILED":
            raise ExperimentFailed(f"experiment {self.experiment.name!r} FAILED: "
                                   f"{self.experiment.reason}")

    def join_jobs(self, timeout: float | None = None) -> None:
        """Wait for the trials started by `run()`; `run()` returns only when all have ended,
        so this returns at once. Kept for the API of the original system."""

    # -- results -------------------------------------------------------------------------

    def get_best_config(self) -> dict[str, Any]:
        """The configuration of the best trial so far, with the user's values
        (e.g. ``{'x': 22, 'y': 69}``); {} when no trial has reported yet."""
        best = self.store.best_trial(self.experiment.id)
        return dict(best.config) if best else {}

    def get_best_reward(self) -> float | None:
        """The best trial's reward (its last report), or None when no trial has reported."""
        best = self.store.best_trial(self.experiment.id)
        return best.last_reward if best else None

    def get_best_trial(self) -> int | None:
        """The number of the best trial so far."""
        best = self.store.best_trial(self.experiment.id)
        return best.number if best else None

    @property
    def training_history(self) -> dict[int, list[dict[str, Any]]]:
        """Trial number -> the list of its reports (metric dicts), in order."""
        return self.store.history(self.experiment.id)

    def get_training_curves(self, filename: str | None = None, plot: bool = False,
                            use_legend: bool = True) -> None:
        """Draw each trial's reward against `time_attr`, the best few in colour with a
        legend beside the plot (`use_legend`), the others grey; save a PNG to `filename`
        when given, show it when `plot`. RuntimeError without matplotlib."""
        from tuned.ui.charts import draw_training_curves

        draw_training_curves(self.training_history, self.spec.reward_attr,
                             self.spec.time_attr, filename=filename, plot=plot,
                             use_legend=use_legend, mode=self.spec.mode,
                             title=f"{self.experiment.name}: {self.spec.reward_attr} "
                                   f"({self.spec.mode})")

    def get_best_so_far(self) -> dict[str, Any]:
        """The best reward so far as step points: ``{"by_trial": [trials, rewards],
        "by_time": [seconds since the first trial, rewards], "metric", "mode"}``."""
        from tuned.store import views

        return views.progress(self.store, self.store.experiment(self.experiment.id))

    def plot_best_so_far(self, filename: str | None = None) -> str | None:
        """The best reward so far against trials and against time: a PNG at `filename`
        (needs matplotlib), else a text chart (returned)."""
        from tuned.ui.charts import best_so_far_chart, draw_best_so_far_png

        data = self.get_best_so_far()
        if filename is None:
            return best_so_far_chart(data["by_trial"], data["by_time"], data["metric"],
                                     data["mode"])
        draw_best_so_far_png(data["by_trial"], data["by_time"], data["metric"], data["mode"],
                             filename, title=f"{self.experiment.name}: best so far")
        return None

    def trials_frame(self):
        """The trials as a pandas DataFrame, one row per trial (number, state, attempt,
        reward, reports, times, a column per parameter: `tuned.store.export`). RuntimeError
        when pandas is not installed."""
        from tuned.store.export import trials_frame

        return trials_frame(self.store, self.store.experiment(self.experiment.id))

    def trials(self):
        """The experiment's trials as stored (state, config, reward, error, ...)."""
        return self.store.trials(self.experiment.id)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(experiment={self.experiment.name!r}, "
                f"checkpoint={self.checkpoint!r})")


def _infer_max_t(train_fn: Callable, max_t: int | None, scheduler: str) -> int:
    """`max_t`, else inferred from `train_fn`'s @tuned.args (`core.factory.infer_max_t`);
    ValueError naming it when there is none."""
    found = infer_max_t({"max_t": max_t}, getattr(train_fn, "args", Args()))
    if found is None:
        raise ValueError(max_t_problem(scheduler))
    return found


class HyperbandScheduler(FIFOScheduler):
    """Asynchronous successive halving: at each rung (`grace_period` * `reduction_factor`**k
    epochs) a trial goes on only if it is among the best 1/`reduction_factor` of the trials
    that reached that rung. `type='stopping'` (default) stops the others there;
    `type='promotion'` pauses every trial at each rung (its process ends, its slot is free)
    and runs the best of them again, from their checkpoints, when they rank in the top
    1/`reduction_factor`. `max_t` is inferred from `train_fn.args.epochs` or `.max_t`."""

    _scheduler = "hyperband_stopping"

    def _scheduler_options(self, train_fn: Callable, options: dict[str, Any]) -> dict[str, Any]:
        kind = options.pop("type", "stopping")
        if kind not in ("stopping", "promotion"):
            raise ValueError(f"type: must be 'stopping' or 'promotion', got {kind!r}")
        self._scheduler = f"hyperband_{kind}"
        known = {"max_t", "grace_period", "reduction_factor", "brackets"}
        unknown = set(options) - known
        if unknown:
            raise TypeError(f"HyperbandScheduler got unexpected argument(s) {sorted(unknown)}")
        out = {k: v for k, v in options.items() if v is not None}
        out["max_t"] = _infer_max_t(train_fn, options.get("max_t"), self._scheduler)
        return out


class PBTScheduler(FIFOScheduler):
    """Population based training (`tuned.core.schedulers.pbt`): the first `num_trials` trials are
    the population; every `perturbation_interval` units of `time_attr`, a trial in the
    bottom `quantile_fraction` is replaced by a clone of a top one (its checkpoint, its
    config perturbed or resampled with `resample_probability`). The training function must
    save checkpoints (`reporter.save_checkpoint`). `max_t` as for HyperbandScheduler."""

    _scheduler = "pbt"

    def _scheduler_options(self, train_fn: Callable, options: dict[str, Any]) -> dict[str, Any]:
        known = {"max_t", "perturbation_interval", "quantile_fraction",
                 "resample_probability"}
        unknown = set(options) - known
        if unknown:
            raise TypeError(f"PBTScheduler got unexpected argument(s) {sorted(unknown)}")
        if options.get("perturbation_interval") is None:
            raise ValueError("perturbation_interval: PBTScheduler needs it (in units of "
                             "time_attr)")
        out = {k: v for k, v in options.items() if v is not None}
        out["max_t"] = _infer_max_t(train_fn, options.get("max_t"), self._scheduler)
        return out


class RLScheduler(FIFOScheduler):
    """FIFO scheduling with the reinforcement-learning controller as searcher, updated with
    REINFORCE after every `controller_batch_size` finished trials."""

    def __init__(self, train_fn: Callable, controller_batch_size: int = 1,
                 controller_lr: float = 1e-3, ema_baseline_decay: float = 0.95,
                 **kwargs: Any):
        options = dict(kwargs.pop("search_options", None) or {})
        options.update(controller_batch_size=controller_batch_size,
                       controller_lr=controller_lr, ema_baseline_decay=ema_baseline_decay)
        kwargs.pop("searcher", None)
        super().__init__(train_fn, searcher="rl", search_options=options, **kwargs)
