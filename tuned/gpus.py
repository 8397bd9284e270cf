"""GPUs found with NVML (pynvml). No NVML library or no GPU means CPU only, never an error.

Tests and machines without GPUs can describe fake ones in ``TUNED_FAKE_GPUS``: a count
(``"2"``) or comma-separated UUIDs (``"GPU-a,GPU-b"``); NVML is then not asked.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass

log = logging.getLogger("tuned.gpus")


@dataclass(frozen=True)
class GPU:
    index: int
    uuid: str
    name: str
    memory_total: int


def discover_gpus() -> list[GPU]:
    """The GPUs NVML sees (or `TUNED_FAKE_GPUS` describes), or [] with one log line saying
    why when there are none."""
    fake = os.environ.get("TUNED_FAKE_GPUS")
    if fake is not None:
        return fake_gpus(fake)
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as exc:  # pynvml raises its own NVMLError family, or ImportError
        log.info("no NVML (%s): running on CPUs only", exc)
        return []
    try:
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            uuid = pynvml.nvmlDeviceGetUUID(handle)
            name = pynvml.nvmlDeviceGetName(handle)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle).total
            gpus.append(GPU(i, _text(uuid), _text(name), int(memory)))
        return gpus
    except Exception as exc:
        log.info("NVML failed while listing GPUs (%s): running on CPUs only", exc)
        return []
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def fake_gpus(description: str) -> list[GPU]:
    """GPUs from a `TUNED_FAKE_GPUS` value; ValueError saying what is wrong with it."""
    description = description.strip()
    if not description:
        return []
    if description.isdigit():
        uuids = [f"GPU-fake-{i}" for i in range(int(description))]
    else:
        uuids = [u.strip() for u in description.split(",")]
        if any(not u for u in uuids) or len(set(uuids)) != len(uuids):
            raise ValueError(f"TUNED_FAKE_GPUS: expected a count or distinct comma-separated "
                             f"UUIDs, got {description!r}")
    return [GPU(i, u, "fake GPU", 16 << 30) for i, u in enumerate(uuids)]


class GPUPool:
    """Which GPUs are free. `take(k)` gives k UUIDs (lowest index first) or None when fewer
    are free; `give` returns them. A GPU is never handed out twice at once."""

    def __init__(self, uuids: Iterable[str]):
        self.order = list(uuids)
        self.free = list(self.order)

    def take(self, k: int) -> list[str] | None:
        if k > len(self.free):
            return None
        taken, self.free = self.free[:k], self.free[k:]
        return taken

    def give(self, uuids: Iterable[str]) -> None:
        for uuid in uuids:
            if uuid in self.free or uuid not in self.order:
                raise ValueError(f"GPU {uuid} was not handed out")
            self.free.append(uuid)
        self.free.sort(key=self.order.index)
