"""GPUs found with NVML (pynvml). No NVML library or no GPU means CPU only, never an error."""

from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger("tuned.gpus")


@dataclass(frozen=True)
class GPU:
    index: int
    uuid: str
    name: str
    memory_total: int


def discover_gpus() -> list[GPU]:
    """The GPUs NVML sees, or [] (with one log line saying why) when it sees none."""
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
