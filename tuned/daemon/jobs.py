"""The daemon's timed jobs, on APScheduler: the stale-trial sweep, the WAL checkpoint, and
cron starts of SCHEDULED experiments. APScheduler runs jobs in its own thread, so a job only
posts a task to the daemon's loop (`post`), which does the work.

coalesce: a job that missed several runs (the machine slept, the loop was busy) runs once,
not once per miss. misfire_grace_time: periodic chores may run late by up to their period; a
cron start may run up to an hour late (a daemon restarted at 03:20 still starts the 03:00
experiment), not later.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

STALE_SWEEP_SECONDS = 1.0
WAL_CHECKPOINT_SECONDS = 60.0
# A cron start may happen this late (seconds), e.g. after the daemon was down at the time.
START_MISFIRE_GRACE = 3600

#: The tasks the jobs post: ``"sweep"``, ``"wal_checkpoint"``, ``("start", experiment_id)``.
Task = Any


class Jobs:
    """The timed jobs of one daemon; each posts its task with `post` (from APScheduler's
    thread: `post` must be safe to call from any thread)."""

    def __init__(self, post: Callable[[Task], None]):
        self.post = post
        self._scheduler: Any = None

    def start(self, scheduled: list[tuple[int, str, str, float]]) -> None:
        """Start the periodic jobs and a cron job for each SCHEDULED experiment of
        `scheduled`, (id, name, cron, created); one whose start fell while no daemon ran, at
        most START_MISFIRE_GRACE seconds ago, is posted to start now."""
        from apscheduler.schedulers.background import BackgroundScheduler

        # Its INFO lines (one per job run) would drown the daemon's own.
        logging.getLogger("apscheduler").setLevel(logging.WARNING)
        self._scheduler = BackgroundScheduler(timezone="UTC", daemon=True, job_defaults={
            "coalesce": True, "max_instances": 1, "misfire_grace_time": 30})
        self._scheduler.add_job(self.post, "interval", seconds=STALE_SWEEP_SECONDS,
                                args=["sweep"], id="stale-trial-sweep")
        self._scheduler.add_job(self.post, "interval", seconds=WAL_CHECKPOINT_SECONDS,
                                args=["wal_checkpoint"], id="wal-checkpoint")
        self._scheduler.start()
        for experiment_id, name, cron, created in scheduled:
            if missed_start(cron, created):
                logging.getLogger("tuned.daemon").info(
                    "experiment %s missed its start while no daemon ran; starting", name)
                self.post(("start", experiment_id))
            self.schedule(experiment_id, cron)

    def schedule(self, experiment_id: int, cron: str) -> None:
        """Post ``("start", experiment_id)`` at the next time `cron` (UTC) matches."""
        from apscheduler.triggers.cron import CronTrigger

        self._scheduler.add_job(self.post, CronTrigger.from_crontab(cron, timezone="UTC"),
                                args=[("start", experiment_id)], id=f"start-{experiment_id}",
                                misfire_grace_time=START_MISFIRE_GRACE, replace_existing=True)

    def cancel(self, experiment_id: int) -> None:
        """Drop the experiment's cron start, if it has one."""
        if self._scheduler is not None and \
                self._scheduler.get_job(f"start-{experiment_id}") is not None:
            self._scheduler.remove_job(f"start-{experiment_id}")

    def shutdown(self) -> None:
        """Stop every job (without waiting for one running)."""
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)


def missed_start(cron: str, created: float) -> bool:
    """Whether the cron fired between the experiment's submission and now, at most
    START_MISFIRE_GRACE seconds ago (the daemon was down then)."""
    from datetime import datetime, timezone

    from apscheduler.triggers.cron import CronTrigger

    trigger = CronTrigger.from_crontab(cron, timezone="UTC")
    fire = trigger.get_next_fire_time(None, datetime.fromtimestamp(created, timezone.utc))
    now = datetime.now(timezone.utc)
    return fire is not None and fire <= now and \
        (now - fire).total_seconds() <= START_MISFIRE_GRACE
