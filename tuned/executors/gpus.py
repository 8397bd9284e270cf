"""GPUs: what the machine has and how they are used (providers: NVML, fake, none).

A GPU is named by its NVML UUID (indices are not stable) and handed to a trial in
``CUDA_VISIBLE_DEVICES``. It is *free* when tuned has not handed it out and no foreign compute
process (one tuned did not launch) uses more than a memory threshold on it.

Providers say which GPUs exist and how they are used:

- `NVMLProvider` asks NVML (the ``pynvml`` module of the nvidia-ml-py distribution). No NVML
  library, no driver or no GPU means no GPUs, said in one log line, never an exception; NVML
  failing later means "no information" for that GPU, again in one log line.
- `FakeProvider` reads ``TUNED_FAKE_GPUS`` (tests, machines without GPUs); NVML is then not
  asked. The value is one of:

  - a count: ``"2"`` gives ``GPU-fake-0`` and ``GPU-fake-1``;
  - comma-separated UUIDs: ``"GPU-a,GPU-b"``;
  - JSON (a value starting with ``[``) or ``@`` and the path of a JSON file, a list like
    ``[{"uuid": "GPU-a", "name": "fake GPU", "memory_total": 17179869184,
    "processes": [{"pid": 4242, "used_memory": 2147483648}]}]`` (only ``uuid`` is required;
    ``memory_used`` defaults to the processes' sum). The file is re-read by every `usage()`,
    so a test can make a GPU busy or free while the daemon runs (replace it atomically).
- `NullProvider`: no GPUs (CPU only).

`make_provider()` picks one of them; `tuned.engine.gpupool.GPUPool` hands GPUs out and
takes foreign use into account through `GPUPool.refresh(provider.usage(our_pids), our_pids)`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from tuned.engine.gpupool import ForeignProcess, GPUUsage

log = logging.getLogger("tuned.gpus")

FAKE_ENV = "TUNED_FAKE_GPUS"
FAKE_MEMORY_TOTAL = 16 << 30


@dataclass(frozen=True)
class GPU:
    """One GPU: its NVML index (at discovery; not stable across boots), UUID, name, memory."""

    index: int
    uuid: str
    name: str
    memory_total: int


# -- providers --------------------------------------------------------------------------------


class GPUProvider:
    """Which GPUs the machine has and how they are used.

    Contract: `gpus()` and `usage()` never raise (a failure is logged and means "no
    information"); `usage()` maps UUID to GPUUsage for the GPUs it knows about right now and
    leaves out a GPU it could not ask; `close()` releases what the provider holds, may be
    called more than once, and after it `usage()` returns {}. Usable as a context manager.
    """

    def gpus(self) -> list[GPU]:
        """The GPUs, lowest index first ([] when none)."""
        return []

    def usage(self, our_pids: Iterable[int] = ()) -> dict[str, GPUUsage]:
        """Current use of each GPU; processes whose pid is in `our_pids` are not foreign."""
        return {}

    def close(self) -> None:
        """Release the provider's resources (idempotent)."""

    def __enter__(self) -> GPUProvider:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class NullProvider(GPUProvider):
    """No GPUs: the machine runs trials on CPUs only. `reason` says why (for status)."""

    def __init__(self, reason: str = "no GPU"):
        self.reason = reason


class NVMLProvider(GPUProvider):
    """GPUs and their use from NVML, initialised once for the provider's life.

    `nvml` is the pynvml module (imported when not given; tests pass a fake). When NVML
    cannot be imported or initialised, or lists no GPU, the provider has no GPUs, `reason`
    says why and one INFO line says so; nothing is raised. Later, a GPU NVML cannot report on
    is left out of `usage()` with one WARNING line (and one INFO line when it answers again).
    """

    def __init__(self, nvml: ModuleType | None = None):
        self.reason = ""
        self._nvml: Any = None
        self._gpus: list[GPU] = []
        self._handles: dict[str, Any] = {}
        self._failing: dict[str, str] = {}
        try:
            if nvml is None:
                import pynvml as nvml
            nvml.nvmlInit()
        except Exception as exc:  # ImportError, or pynvml's NVMLError family (no driver...)
            self.reason = f"no NVML library or driver ({_describe(exc)})"
            log.info("%s: CPU only", self.reason)
            return
        self._nvml = nvml
        try:
            count = int(nvml.nvmlDeviceGetCount())
        except Exception as exc:
            self.reason = f"NVML could not count the GPUs ({_describe(exc)})"
            log.info("%s: CPU only", self.reason)
            self.close()
            return
        skipped = []
        for index in range(count):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                uuid = _text(nvml.nvmlDeviceGetUUID(handle))
                name = _text(nvml.nvmlDeviceGetName(handle))
                total = int(nvml.nvmlDeviceGetMemoryInfo(handle).total)
            except Exception as exc:  # one GPU NVML cannot open must not hide the others
                skipped.append(f"GPU {index}: {_describe(exc)}")
                continue
            self._handles[uuid] = handle
            self._gpus.append(GPU(index, uuid, name, total))
        if skipped:
            log.warning("NVML could not open %s; left out", "; ".join(skipped))
        if not self._gpus:
            self.reason = "NVML sees no GPU" + (f" it can open ({'; '.join(skipped)})"
                                                if skipped else "")
            log.info("%s: CPU only", self.reason)
            self.close()

    def gpus(self) -> list[GPU]:
        return list(self._gpus)

    def usage(self, our_pids: Iterable[int] = ()) -> dict[str, GPUUsage]:
        nvml = self._nvml
        if nvml is None:
            return {}
        ours = set(our_pids)
        result: dict[str, GPUUsage] = {}
        for uuid, handle in self._handles.items():
            try:
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                processes = nvml.nvmlDeviceGetComputeRunningProcesses(handle)
                foreign = [ForeignProcess(int(p.pid), _bytes_or_none(p.usedGpuMemory))
                           for p in processes if int(p.pid) not in ours]
                result[uuid] = GPUUsage(int(memory.used), int(memory.total), foreign)
            except Exception as exc:  # NVMLError (GPU lost, not supported...) or odd data
                if uuid not in self._failing:
                    log.warning("NVML cannot report on GPU %s (%s): no information on "
                                "foreign processes there", uuid, _describe(exc))
                self._failing[uuid] = _describe(exc)
                continue
            if self._failing.pop(uuid, None) is not None:
                log.info("NVML reports on GPU %s again", uuid)
        return result

    def close(self) -> None:
        nvml, self._nvml = self._nvml, None
        if nvml is None:
            return
        try:
            nvml.nvmlShutdown()
        except Exception as exc:
            log.debug("nvmlShutdown failed: %s", _describe(exc))


class FakeProvider(GPUProvider):
    """GPUs described by a `TUNED_FAKE_GPUS` value (see the module docstring).

    The constructor raises ValueError saying what is wrong with the value (or the file). A
    ``@file`` is re-read by every `usage()`; when it has become unreadable or invalid,
    `usage()` returns {} with one WARNING line (until it is valid again), never raises.
    """

    def __init__(self, description: str):
        self.description = description.strip()
        self.path = self.description[1:] if self.description.startswith("@") else None
        self._gpus, self._usage = _parse_fake(self.description)
        self._broken: str | None = None

    def gpus(self) -> list[GPU]:
        return list(self._gpus)

    def usage(self, our_pids: Iterable[int] = ()) -> dict[str, GPUUsage]:
        usage = self._usage
        if self.path is not None:
            try:
                _, usage = _parse_fake(self.description)
            except ValueError as exc:
                if self._broken is None:
                    log.warning("%s: no information on GPU use", exc)
                self._broken = str(exc)
                return {}
            self._broken = None
        return _without(usage, set(our_pids))


def make_provider() -> GPUProvider:
    """The provider for this machine: `FakeProvider` when `TUNED_FAKE_GPUS` is set (a bad
    value raises ValueError), else `NVMLProvider` when NVML lists GPUs, else `NullProvider`
    (the NVML attempt logged one line saying why). The caller closes it."""
    fake = os.environ.get(FAKE_ENV)
    if fake is not None:
        return FakeProvider(fake)
    provider = NVMLProvider()
    if provider.gpus():
        return provider
    provider.close()
    return NullProvider(provider.reason)


def discover_gpus() -> list[GPU]:
    """The GPUs NVML sees (or `TUNED_FAKE_GPUS` describes), or [] with one log line saying
    why when there are none. NVML is initialised and shut down again."""
    with make_provider() as provider:
        return provider.gpus()


def fake_gpus(description: str) -> list[GPU]:
    """GPUs from a `TUNED_FAKE_GPUS` value; ValueError saying what is wrong with it."""
    return FakeProvider(description).gpus()


def _parse_fake(description: str) -> tuple[list[GPU], dict[str, GPUUsage]]:
    if not description:
        return [], {}
    if description.isdigit():
        uuids = [f"GPU-fake-{i}" for i in range(int(description))]
    elif description.startswith(("@", "[", "{")):
        return _parse_fake_json(description)
    else:
        uuids = [u.strip() for u in description.split(",")]
        if any(not u for u in uuids) or len(set(uuids)) != len(uuids):
            raise ValueError(f"{FAKE_ENV}: expected a count, distinct comma-separated UUIDs, "
                             f"JSON or @file, got {description!r}")
    gpus = [GPU(i, u, "fake GPU", FAKE_MEMORY_TOTAL) for i, u in enumerate(uuids)]
    return gpus, {u: GPUUsage(0, FAKE_MEMORY_TOTAL) for u in uuids}


def _parse_fake_json(description: str) -> tuple[list[GPU], dict[str, GPUUsage]]:
    where = FAKE_ENV
    text = description
    if description.startswith("@"):
        where = f"{FAKE_ENV} file {description[1:]!r}"
        try:
            with open(description[1:], encoding="utf-8") as f:
                text = f.read()
        except OSError as exc:
            raise ValueError(f"{where}: cannot read it ({exc.strerror or exc})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: not valid JSON ({exc})") from None
    if not isinstance(data, list):
        raise ValueError(f"{where}: expected a JSON list of GPUs, got {type(data).__name__}")
    gpus: list[GPU] = []
    usage: dict[str, GPUUsage] = {}
    for i, entry in enumerate(data):
        at = f"{where}: GPU {i}"
        if not isinstance(entry, dict):
            raise ValueError(f"{at}: expected an object, got {entry!r}")
        unknown = set(entry) - {"uuid", "name", "memory_total", "memory_used", "processes"}
        if unknown:
            raise ValueError(f"{at}: unknown key(s) {sorted(unknown)}")
        uuid = entry.get("uuid")
        if not isinstance(uuid, str) or not uuid.strip():
            raise ValueError(f"{at}: 'uuid' must be a non-empty string, got {uuid!r}")
        uuid = uuid.strip()
        if uuid in usage:
            raise ValueError(f"{at}: UUID {uuid!r} appears twice")
        name = entry.get("name", "fake GPU")
        if not isinstance(name, str):
            raise ValueError(f"{at}: 'name' must be a string, got {name!r}")
        total = _count(entry.get("memory_total", FAKE_MEMORY_TOTAL), f"{at}: 'memory_total'")
        processes = entry.get("processes", [])
        if not isinstance(processes, list):
            raise ValueError(f"{at}: 'processes' must be a list, got {processes!r}")
        procs = []
        for j, p in enumerate(processes):
            if not isinstance(p, dict) or set(p) - {"pid", "used_memory"} or "pid" not in p:
                raise ValueError(f"{at}: process {j}: expected {{\"pid\": int, "
                                 f"\"used_memory\": int or null}}, got {p!r}")
            memory = p.get("used_memory")
            procs.append(ForeignProcess(
                _count(p["pid"], f"{at}: process {j}: 'pid'"),
                None if memory is None else _count(memory, f"{at}: process {j}: 'used_memory'")))
        used = entry.get("memory_used")
        used = (sum(p.used_memory or 0 for p in procs) if used is None
                else _count(used, f"{at}: 'memory_used'"))
        gpus.append(GPU(i, uuid, name, total))
        usage[uuid] = GPUUsage(used, total, procs)
    return gpus, usage


def _count(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{what} must be an integer >= 0, got {value!r}")
    return value


def _without(usage: Mapping[str, GPUUsage], ours: set[int]) -> dict[str, GPUUsage]:
    """`usage` with the processes whose pid is in `ours` left out of `foreign`."""
    return {uuid: GPUUsage(u.memory_used, u.memory_total,
                           [p for p in u.foreign if p.pid not in ours])
            for uuid, u in usage.items()}


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _bytes_or_none(value: int | None) -> int | None:
    """NVML's usedGpuMemory: bytes, or None when not available (pynvml maps its
    NVML_VALUE_NOT_AVAILABLE to None)."""
    return None if value is None else int(value)


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
