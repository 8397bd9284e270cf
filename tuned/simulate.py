"""Run an experiment on the simulated executor: the real engine, searcher, scheduler and
store, with step functions for trials and a virtual clock.

    from tuned.simulate import simulate
    result = simulate(spec, steps, workers=4, seed=0)
    result.makespan, result.trials, result.timeline

The store is a real SQLite file opened with ``durable=False`` (``synchronous=OFF``): in a
temporary directory, removed afterwards, unless `store_path` names a file to keep. Its
clock is the virtual one, so every time it records (created, started, ended) is virtual.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tuned.engine.engine import Engine
from tuned.engine.resources import ResourcePool
from tuned.executors.simulated import SimulatedExecutor, StepFunction
from tuned.experiment.spec import ExperimentSpec
from tuned.store.database import Report, Store, Trial

__all__ = ["Simulation", "simulate"]


@dataclass
class Simulation:
    """What a simulated run left.

    `trials` are the stored trials by number; `reports[number]` that trial's stored reports
    in order; `timeline` every stored report in the order the engine stored it, as the
    engine's "report" event (``trial``, ``seq``, ``time``, ``reward``, ``decision``) plus
    ``clock`` (the virtual time it was stored at). `makespan` is the virtual time from the
    start to the last event; `wall_seconds` the real time the run took; `launches` how many
    times a trial was launched (a paused trial resumed is launched again).
    """

    spec: ExperimentSpec
    experiment_id: int
    trials: list[Trial]
    reports: dict[int, list[Report]]
    timeline: list[dict[str, Any]]
    makespan: float
    wall_seconds: float
    launches: int
    store_path: str | None

    @property
    def n_reports(self) -> int:
        return len(self.timeline)

    def best(self) -> Trial | None:
        """The trial with the highest score (ties: the earliest), as the store ranks them."""
        scored = [t for t in self.trials if t.score is not None]
        return max(scored, key=lambda t: (t.score, -t.number)) if scored else None


def simulate(spec: ExperimentSpec, steps: StepFunction, workers: int = 1, *,
             store_path: str | os.PathLike | None = None, seed: int | None = None,
             max_reports: int | None = None, launch_seconds: float = 0.0,
             checkpoint_every: int | None = 1,
             on_event: Callable[[dict[str, Any]], None] | None = None) -> Simulation:
    """Run `spec` to its end with `workers` trials at once, each trial running
    ``steps(config, seed, start)`` (see `tuned.executors.simulated`).

    `seed` replaces the spec's seed (one of them must be set). `max_reports`: once that many
    reports are stored, no new trial starts; the running ones go on to their end, so a few
    more reports may follow (cut the `timeline` where you need an exact budget).
    `launch_seconds` and `checkpoint_every` go to the executor. `on_event` hears the engine's
    events (start, report, end) as they are stored. ValueError for a spec the engine refuses.
    """
    if seed is not None:
        spec = dataclasses.replace(spec, seed=seed)
    if spec.seed is None:
        raise ValueError("seed: give the spec a seed or pass seed=")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers!r}")
    executor = SimulatedExecutor(steps, launch_seconds=launch_seconds,
                                 checkpoint_every=checkpoint_every)
    with tempfile.TemporaryDirectory(prefix="tuned-sim-") as tmp:
        path = os.fspath(store_path) if store_path is not None else os.path.join(tmp, "sim.db")
        store = Store(path, clock=executor.clock, preallocate=False, durable=False)
        try:
            return _run(store, spec, executor, workers, max_reports, on_event, tmp,
                        None if store_path is None else path)
        finally:
            store.close()


def _run(store: Store, spec: ExperimentSpec, executor: SimulatedExecutor, workers: int,
         max_reports: int | None, on_event: Callable[[dict[str, Any]], None] | None,
         tmp: str, kept_path: str | None) -> Simulation:
    """Drive the engine to the end (as `Engine.run` does, without its Ctrl-C guard and its
    spare processes) and collect what the store holds."""
    timeline: list[dict[str, Any]] = []
    name = store.unique_name(spec.name)
    experiment = store.create_experiment(name, dataclasses.replace(spec, name=name).to_dict())

    def hear(event: dict[str, Any]) -> None:
        if event.get("event") == "report":
            timeline.append({**event, "clock": executor.now})
        if on_event is not None:
            on_event(event)

    # Fake GPUs: the simulated trials use none, they are only counted.
    gpus = [f"GPU-sim-{i}" for i in range(workers * spec.num_gpus)]
    engine = Engine(store, experiment, spec, executor,
                    ResourcePool(workers * spec.num_cpus, gpus), os.path.join(tmp, "logs"),
                    workers, on_event=hear, clock=executor.clock)
    began = time.perf_counter()
    engine.start()
    engine.step([])
    while engine.live:
        if max_reports is not None and len(timeline) >= max_reports:
            engine.exhausted = True
        engine.step(executor.poll(engine.timeout()))
    engine.close()
    wall = time.perf_counter() - began
    trials = store.trials(experiment.id)
    reports = {t.number: store.reports(t.id) for t in trials}
    return Simulation(spec, experiment.id, trials, reports, timeline, executor.now, wall,
                      executor.launches, kept_path)
