"""Human output of `tunectl` and `tuned`: the answers of the read ops as text that fits a
100-column terminal (stdlib only: `tunectl` imports it at every start).

Rules: numbers at 6 significant digits for rewards and 4 for configuration values
(``0.0055``, not ``0.0055000000000000005``); a configuration as ``name=value`` pairs; trial
counts in words (``8 completed, 2 running``); a reward with its metric and direction
(``loss (min) 0.1234``); every line clipped to `WIDTH` columns (``...`` marks a cut).
`tunectl best` and `tuned best` print the same line for the same trial, and so on for each
command the two share.
"""

from __future__ import annotations

import json
from typing import Any

WIDTH = 100
#: The order trial states are listed in.
STATE_ORDER = ("RUNNING", "PENDING", "PAUSED", "COMPLETED", "STOPPED", "FAILED")


def clip(line: str, width: int = WIDTH) -> str:
    """`line` cut to `width` columns, ending in ``...`` when it was longer."""
    return line if len(line) <= width else line[:width - 3] + "..."


def num(value: Any, digits: int = 6) -> str:
    """A number at `digits` significant digits (integers whole); ``-`` for None."""
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}g}"


def config_text(config: dict[str, Any]) -> str:
    """``lr=0.0028 wd=0.0096 act=relu``: numbers at 4 digits, other values as JSON."""
    parts = []
    for name, value in config.items():
        if isinstance(value, float):
            shown = num(value, 4)
        elif isinstance(value, str) and value and " " not in value and "=" not in value:
            shown = value
        else:
            shown = json.dumps(value)
        parts.append(f"{name}={shown}")
    return " ".join(parts)


def metric_label(metric: str | None, mode: str | None) -> str:
    """``accuracy (max)``; the metric alone when its direction is unknown."""
    metric = metric or "reward"
    return f"{metric} ({mode})" if mode else metric


def counts_text(counts: dict[str, int]) -> str:
    """Trials by state in words, e.g. ``2 running, 8 completed``; ``no trials`` for none."""
    states = sorted(counts, key=lambda s: (STATE_ORDER.index(s) if s in STATE_ORDER
                                           else len(STATE_ORDER), s))
    words = [f"{counts[s]} {s.lower()}" for s in states if counts[s]]
    return ", ".join(words) or "no trials"


def best_line(best: dict[str, Any], metric: str | None = None, mode: str | None = None) -> str:
    """``trial 45: accuracy (max) 0.999964  lr=0.0028 wd=0.0096`` (the `best` answer, or
    a summary's best with the summary's metric)."""
    label = metric_label(best.get("metric", metric), best.get("mode", mode))
    return clip(f"trial {best['trial']}: {label} {num(best['reward'])}  "
                f"{config_text(best.get('config') or {})}")


def _budget(summary: dict[str, Any]) -> str:
    made = sum(summary["trials"].values())
    total = summary.get("num_trials")
    text = f"{made} of {total} trials" if total is not None else f"{made} trials"
    if summary.get("time_out") is not None:
        text += f" (time_out {num(summary['time_out'], 4)} s)"
    return text


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """One experiment of `status`: its state, budget and trials by state; its best trial;
    the reason for its state and why it waits, when there is one."""
    lines = [clip(f"{summary['experiment']}  {summary['state']}  {_budget(summary)}: "
                  f"{counts_text(summary['trials'])}")]
    metric, mode = summary.get("metric"), summary.get("mode")
    if summary.get("best"):
        lines.append(clip("  best: " + best_line(summary["best"], metric, mode)))
    else:
        lines.append(f"  best: none yet ({metric_label(metric, mode)})")
    if summary.get("reason"):
        lines.append(clip(f"  reason: {summary['reason']}"))
    if summary.get("waiting"):
        lines.append(clip(f"  {summary['waiting']}"))
    return lines


def status_text(data: dict[str, Any]) -> str:
    """The `status` answer: each experiment (`summary_lines`), then the daemon's CPUs and
    GPUs when the answer has them."""
    lines = [line for e in data["experiments"] for line in summary_lines(e)]
    if not data["experiments"]:
        lines.append("no experiments")
    if "cpus" in data:
        gpus = ", ".join(data.get("gpus_in_use") or []) or "none"
        lines.append(clip(f"CPUs: {num(data['cpus_free'])} of {num(data['cpus'])} free; "
                          f"GPUs in use: {gpus}"))
    if data.get("cluster"):
        lines += cluster_lines(data["cluster"])
    return "\n".join(lines)


def cluster_lines(cluster: dict[str, Any]) -> list[str]:
    """The Dask cluster in `status`: reachable or not (and why), then one line a worker:
    its name, address and host, threads, GPUs, the trials of ours it runs."""
    if not cluster.get("reachable"):
        return [clip(f"Dask cluster UNREACHABLE: {cluster.get('problem')}"),
                clip(f"  scheduler {cluster.get('scheduler')}")]
    workers = cluster.get("workers") or []
    tls = " over TLS" if cluster.get("tls") else ""
    lines = [clip(f"Dask cluster: {len(workers)} worker(s); trials report to "
                  f"{cluster.get('listener')}{tls}"),
             clip(f"  scheduler {cluster.get('scheduler')}")]
    for w in workers:
        gpus = num(w.get("gpus") or 0)
        lines.append(clip(f"  {w.get('name')}  {w.get('address')} on {w.get('host')}: "
                          f"{w.get('nthreads')} thread(s), {gpus} GPU(s), "
                          f"{len(w.get('runs') or [])} trial(s) running"))
    return lines


def trials_text(data: dict[str, Any]) -> str:
    """The `trials` answer as a table: number, state, attempt, reports, reward, config; a
    PBT clone's parent and a failed trial's error on the line after it."""
    label = metric_label(data.get("metric"), data.get("mode"))
    rows = [clip(f"{'trial':>5}  {'state':<9}  {'attempt':>7}  {'reports':>7}  "
                 f"{label:<14}  config")]
    for t in data["trials"]:
        rows.append(clip(f"{t['trial']:>5}  {t['state']:<9}  {t['attempt']:>7}  "
                         f"{t['reports']:>7}  {num(t['reward']):<14}  "
                         f"{config_text(t['config'])}"))
        if t.get("parent") is not None:
            rows.append(clip(f"{'':>7}from trial {t['parent']}"))
        if t.get("worker"):
            rows.append(clip(f"{'':>7}on {t.get('host')}, Dask worker {t['worker']}"))
        if t.get("error"):
            rows.append(clip(f"{'':>7}error: {' '.join(str(t['error']).split())}"))
    return "\n".join(rows) if data["trials"] else "no trials"


def event_line(event: dict[str, Any]) -> str:
    """One `watch` event: a trial's start, report or end."""
    head = f"{event.get('experiment')} trial {event.get('trial')}"
    kind = event.get("event")
    if kind == "start":
        return clip(f"{head} started (attempt {event['attempt']}) "
                    f"{config_text(event['config'])}")
    if kind == "report":
        return clip(f"{head} report {event['seq']}: reward {num(event['reward'])} at "
                    f"{num(event['time'])} -> {event['decision']}")
    if kind == "end":
        error = f": {event['error']}" if event.get("error") else ""
        return clip(f"{head} ended {event['state']}{error}")
    return clip(json.dumps(event))
