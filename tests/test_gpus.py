"""GPUs: the fake provider's forms, NVML through a fake pynvml, and the pool's free rules."""

from __future__ import annotations

import json
import logging
import os
import sys
import types

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tuned.engine.gpupool import DEFAULT_FOREIGN_THRESHOLD, ForeignProcess, GPUPool, GPUUsage
from tuned.engine.resources import ResourcePool
from tuned.executors.gpus import (
    GPU,
    FakeProvider,
    NullProvider,
    NVMLProvider,
    discover_gpus,
    fake_gpus,
    make_provider,
)

MiB = 1 << 20
GiB = 1 << 30


def _gpu_log(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "tuned.gpus"]


def _write_json(path, data) -> None:
    """Replace `path` atomically, as a test changing a GPU's use under a running daemon must."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f)
    os.replace(tmp, path)


# -- the fake provider ------------------------------------------------------------------------


def test_fake_count_and_list_keep_their_meaning():
    assert [g.uuid for g in fake_gpus("2")] == ["GPU-fake-0", "GPU-fake-1"]
    assert fake_gpus("GPU-a, GPU-b") == [GPU(0, "GPU-a", "fake GPU", 16 * GiB),
                                         GPU(1, "GPU-b", "fake GPU", 16 * GiB)]
    assert fake_gpus("") == [] and fake_gpus("0") == []
    usage = FakeProvider("GPU-a,GPU-b").usage()
    assert usage == {"GPU-a": GPUUsage(0, 16 * GiB, []), "GPU-b": GPUUsage(0, 16 * GiB, [])}


def test_fake_json_value():
    value = json.dumps([
        {"uuid": "GPU-a", "memory_total": 8 * GiB,
         "processes": [{"pid": 4242, "used_memory": 2 * GiB}, {"pid": 7, "used_memory": None}]},
        {"uuid": "GPU-b", "name": "Tesla Fake", "memory_used": 5},
    ])
    provider = FakeProvider(value)
    assert provider.gpus() == [GPU(0, "GPU-a", "fake GPU", 8 * GiB),
                               GPU(1, "GPU-b", "Tesla Fake", 16 * GiB)]
    usage = provider.usage()
    assert usage["GPU-a"] == GPUUsage(2 * GiB, 8 * GiB, [ForeignProcess(4242, 2 * GiB),
                                                         ForeignProcess(7, None)])
    assert usage["GPU-b"] == GPUUsage(5, 16 * GiB, [])
    # Our own pids are left out of `foreign`.
    assert provider.usage(our_pids={4242})["GPU-a"].foreign == [ForeignProcess(7, None)]


def test_fake_file_is_reread_by_usage(tmp_path):
    path = tmp_path / "gpus.json"
    _write_json(path, [{"uuid": "GPU-a"}, {"uuid": "GPU-b"}])
    provider = FakeProvider(f"@{path}")
    assert [g.uuid for g in provider.gpus()] == ["GPU-a", "GPU-b"]
    assert provider.usage()["GPU-b"].foreign == []
    _write_json(path, [{"uuid": "GPU-a"},
                       {"uuid": "GPU-b", "processes": [{"pid": 99, "used_memory": GiB}]}])
    assert provider.usage()["GPU-b"] == GPUUsage(GiB, 16 * GiB, [ForeignProcess(99, GiB)])


def test_fake_file_gone_bad_means_no_information_once(tmp_path, caplog):
    path = tmp_path / "gpus.json"
    _write_json(path, [{"uuid": "GPU-a"}])
    provider = FakeProvider(f"@{path}")
    path.write_text("[{")
    with caplog.at_level(logging.INFO):
        assert provider.usage() == {}
        assert provider.usage() == {}
    assert len(_gpu_log(caplog)) == 1 and "not valid JSON" in caplog.text
    _write_json(path, [{"uuid": "GPU-a"}])
    assert list(provider.usage()) == ["GPU-a"]


@pytest.mark.parametrize("value, message", [
    ("GPU-a,,GPU-b", "comma-separated"),
    ("GPU-a,GPU-a", "comma-separated"),
    ("[1", "not valid JSON"),
    ('{"uuid": "GPU-a"}', "expected a JSON list"),
    ("[1]", "expected an object"),
    ('[{"uuid": ""}]', "'uuid' must be a non-empty string"),
    ('[{"uuid": "a"}, {"uuid": "a"}]', "appears twice"),
    ('[{"uuid": "a", "memory_total": -1}]', "'memory_total' must be an integer >= 0"),
    ('[{"uuid": "a", "processes": [{"pid": true}]}]', "'pid' must be an integer"),
    ('[{"uuid": "a", "processes": [{"used_memory": 1}]}]', "process 0: expected"),
    ('[{"uuid": "a", "colour": "red"}]', "unknown key"),
    ("@/nonexistent/gpus.json", "cannot read it"),
])
def test_fake_values_that_are_wrong_say_why(value, message):
    with pytest.raises(ValueError, match=message):
        fake_gpus(value)


def test_make_provider_and_discover_use_the_fake_when_set(monkeypatch, tmp_path):
    monkeypatch.setenv("TUNED_FAKE_GPUS", "3")
    assert isinstance(make_provider(), FakeProvider)
    assert len(discover_gpus()) == 3
    path = tmp_path / "g.json"
    _write_json(path, [{"uuid": "GPU-x"}])
    monkeypatch.setenv("TUNED_FAKE_GPUS", f"@{path}")
    assert [g.uuid for g in discover_gpus()] == ["GPU-x"]


# -- the pool ---------------------------------------------------------------------------------


def test_foreign_process_above_threshold_keeps_a_gpu_until_it_leaves(tmp_path):
    path = tmp_path / "gpus.json"
    _write_json(path, [{"uuid": "GPU-a", "processes": [{"pid": 4242, "used_memory": GiB}]},
                       {"uuid": "GPU-b"}])
    provider = FakeProvider(f"@{path}")
    pool = GPUPool([g.uuid for g in provider.gpus()])
    assert pool.refresh(provider.usage()) is True
    assert pool.free == ["GPU-b"]
    assert pool.busy_foreign() == {"GPU-a": [4242]}
    assert pool.take(2) is None
    assert pool.take(1) == ["GPU-b"]
    assert pool.take(1) is None  # GPU-a is busy, GPU-b is ours

    _write_json(path, [{"uuid": "GPU-a"}, {"uuid": "GPU-b"}])
    assert pool.take(1) is None  # nothing changes until the next refresh
    assert pool.refresh(provider.usage()) is True
    assert pool.busy_foreign() == {}
    assert pool.take(1) == ["GPU-a"]
    assert pool.refresh(provider.usage()) is False


def test_foreign_process_below_threshold_leaves_a_gpu_free():
    pool = GPUPool(["GPU-a"])
    assert pool.foreign_threshold == DEFAULT_FOREIGN_THRESHOLD == 256 * MiB
    pool.refresh({"GPU-a": GPUUsage(256 * MiB, 16 * GiB, [ForeignProcess(1, 256 * MiB)])})
    assert pool.free == ["GPU-a"] and pool.busy_foreign() == {}
    pool.refresh({"GPU-a": GPUUsage(0, 16 * GiB, [ForeignProcess(1, 256 * MiB + 1)])})
    assert pool.free == []


def test_unknown_memory_counts_as_above_and_no_information_as_free():
    pool = GPUPool(["GPU-a", "GPU-b"])
    pool.refresh({"GPU-a": GPUUsage(0, 16 * GiB, [ForeignProcess(5, None)]),
                  "GPU-zz": GPUUsage(0, 1, [ForeignProcess(6, GiB)])})  # unknown UUID ignored
    assert pool.busy_foreign() == {"GPU-a": [5]}
    pool.refresh({})  # no information: allocation alone decides
    assert pool.free == ["GPU-a", "GPU-b"]


def test_our_own_pids_are_not_foreign():
    pool = GPUPool(["GPU-a"])
    usage = {"GPU-a": GPUUsage(GiB, 16 * GiB, [ForeignProcess(100, GiB)])}
    pool.refresh(usage, our_pids={100})
    assert pool.free == ["GPU-a"]
    pool.refresh(usage, our_pids={101})
    assert pool.free == []


def test_threshold_is_settable(monkeypatch, caplog):
    usage = {"GPU-a": GPUUsage(0, 16 * GiB, [ForeignProcess(1, 100 * MiB)])}
    pool = GPUPool(["GPU-a"], foreign_threshold=64 * MiB)
    pool.refresh(usage)
    assert pool.free == []
    monkeypatch.setenv("TUNED_GPU_FOREIGN_MIB", "0")
    assert GPUPool(["GPU-a"]).foreign_threshold == 0
    monkeypatch.setenv("TUNED_GPU_FOREIGN_MIB", "lots")
    with caplog.at_level(logging.INFO):
        assert GPUPool(["GPU-a"]).foreign_threshold == DEFAULT_FOREIGN_THRESHOLD
    assert "TUNED_GPU_FOREIGN_MIB" in caplog.text
    with pytest.raises(ValueError):
        GPUPool(["GPU-a"], foreign_threshold=-1)


def test_a_busy_gpu_we_hold_stays_ours_and_is_not_free_once_given_back():
    pool = GPUPool(["GPU-a", "GPU-b"])
    assert pool.take(1) == ["GPU-a"]
    pool.refresh({"GPU-a": GPUUsage(GiB, 16 * GiB, [ForeignProcess(9, GiB)])})
    assert pool.allocated == ["GPU-a"] and pool.busy_foreign() == {"GPU-a": [9]}
    pool.give(["GPU-a"])
    assert pool.allocated == [] and pool.free == ["GPU-b"]


def test_give_refuses_what_was_not_handed_out():
    pool = GPUPool(["GPU-a", "GPU-b", "GPU-c"])
    with pytest.raises(ValueError, match="GPU GPU-a was not handed out"):
        pool.give(["GPU-a"])
    with pytest.raises(ValueError, match="not handed out"):
        pool.give(["GPU-zz"])
    taken = pool.take(2)
    assert taken == ["GPU-a", "GPU-b"]
    with pytest.raises(ValueError):
        pool.give(["GPU-a", "GPU-a"])
    with pytest.raises(ValueError):
        pool.give(["GPU-a", "GPU-c"])
    assert pool.allocated == ["GPU-a", "GPU-b"]  # a refused give changes nothing
    pool.give(reversed(taken))
    assert pool.free == ["GPU-a", "GPU-b", "GPU-c"]
    with pytest.raises(ValueError):
        pool.take(-1)
    with pytest.raises(ValueError, match="distinct"):
        GPUPool(["GPU-a", "GPU-a"])
    assert pool.take(0) == []


def test_resource_pool_waits_for_foreign_use_to_end():
    resources = ResourcePool(4, ["GPU-a", "GPU-b"])
    resources.gpus.refresh({"GPU-a": GPUUsage(GiB, 16 * GiB, [ForeignProcess(9, GiB)])})
    assert not resources.can_take(1, 2) and resources.take(1, 2) is None
    grant = resources.take(1, 1)
    assert grant is not None and grant.gpus == ["GPU-b"]
    resources.gpus.refresh({})
    assert resources.take(1, 1).gpus == ["GPU-a"]


UUIDS = [f"GPU-{c}" for c in "abcde"]
_op = st.one_of(
    st.tuples(st.just("take"), st.integers(0, 6)),
    st.tuples(st.just("give"), st.integers(0, 20)),
    st.tuples(st.just("busy"), st.sets(st.sampled_from(UUIDS))),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_op, max_size=40))
def test_random_take_give_never_double_allocates(ops):
    pool = GPUPool(UUIDS)
    grants: list[list[str]] = []
    busy: set[str] = set()
    for op, arg in ops:
        if op == "take":
            free_before = pool.free
            got = pool.take(arg)
            if got is None:
                assert arg > len(free_before) and pool.free == free_before
            else:
                assert got == free_before[:arg]
                assert not set(got) & busy
                grants.append(got)
        elif op == "give" and grants:
            pool.give(grants.pop(arg % len(grants)))
        elif op == "busy":
            busy = set(arg)
            pool.refresh({u: GPUUsage(GiB, 16 * GiB, [ForeignProcess(1, GiB)]) for u in busy})
        held = [u for g in grants for u in g]
        assert len(held) == len(set(held)), "a GPU is held by two grants"
        assert sorted(held) == sorted(pool.allocated)
        assert set(pool.free) == set(UUIDS) - set(held) - busy
    for g in grants:
        pool.give(g)
    assert pool.allocated == []


# -- NVML through a fake pynvml ---------------------------------------------------------------


class FakeNVMLError(Exception):
    pass


def _fake_pynvml(devices: list[dict], init_error: Exception | None = None) -> types.ModuleType:
    """A module object with the few pynvml functions NVMLProvider calls. Each device is a
    dict: uuid, name, total, used, processes [(pid, used or None)], and optionally
    'fail': an exception its usage calls raise, 'open_fail': one its handle lookup raises."""
    m = types.ModuleType("pynvml")
    m.NVMLError = FakeNVMLError
    m.calls = []

    def init():
        m.calls.append("init")
        if init_error is not None:
            raise init_error

    def handle(i):
        if devices[i].get("open_fail"):
            raise devices[i]["open_fail"]
        return devices[i]

    def memory(h):
        if h.get("fail"):
            raise h["fail"]
        return types.SimpleNamespace(total=h["total"], used=h["used"], free=h["total"] - h["used"])

    def processes(h):
        if h.get("fail"):
            raise h["fail"]
        return [types.SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in h["processes"]]

    m.nvmlInit = init
    m.nvmlShutdown = lambda: m.calls.append("shutdown")
    m.nvmlDeviceGetCount = lambda: len(devices)
    m.nvmlDeviceGetHandleByIndex = handle
    m.nvmlDeviceGetUUID = lambda h: h["uuid"]
    m.nvmlDeviceGetName = lambda h: h["name"]
    m.nvmlDeviceGetMemoryInfo = memory
    m.nvmlDeviceGetComputeRunningProcesses = processes
    return m


def _devices() -> list[dict]:
    return [
        {"uuid": b"GPU-1111", "name": b"NVIDIA H100", "total": 80 * GiB, "used": 3 * GiB,
         "processes": [(500, 2 * GiB), (600, GiB)]},
        {"uuid": "GPU-2222", "name": "NVIDIA H100", "total": 80 * GiB, "used": 0,
         "processes": []},
    ]


def test_nvml_missing_means_no_gpus_with_one_log_line(monkeypatch, caplog):
    monkeypatch.delenv("TUNED_FAKE_GPUS", raising=False)
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml raises ImportError
    with caplog.at_level(logging.DEBUG):
        provider = NVMLProvider()
        assert provider.gpus() == [] and provider.usage() == {}
        provider.close()
    records = _gpu_log(caplog)
    assert len(records) == 1 and "no NVML library" in records[0].getMessage()
    assert "CPU only" in records[0].getMessage()

    caplog.clear()
    with caplog.at_level(logging.DEBUG):
        provider = make_provider()
        assert isinstance(provider, NullProvider) and "no NVML library" in provider.reason
        assert discover_gpus() == []
    assert len(_gpu_log(caplog)) == 2  # one line per attempt


def test_nvml_init_failing_means_no_gpus_with_one_log_line(monkeypatch, caplog):
    monkeypatch.delenv("TUNED_FAKE_GPUS", raising=False)
    fake = _fake_pynvml(_devices(), init_error=FakeNVMLError("Driver Not Loaded"))
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    with caplog.at_level(logging.DEBUG):
        assert discover_gpus() == []
    records = _gpu_log(caplog)
    assert len(records) == 1 and "Driver Not Loaded" in records[0].getMessage()
    assert fake.calls == ["init"]  # no shutdown after a failed init


def test_nvml_without_gpus_means_cpu_only(caplog):
    fake = _fake_pynvml([])
    with caplog.at_level(logging.DEBUG):
        provider = NVMLProvider(fake)
        assert provider.gpus() == [] and provider.usage() == {}
    assert len(_gpu_log(caplog)) == 1 and "no GPU" in provider.reason
    assert fake.calls == ["init", "shutdown"]


def test_nvml_lists_gpus_and_usage(monkeypatch):
    fake = _fake_pynvml(_devices())
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    provider = NVMLProvider()
    assert provider.gpus() == [GPU(0, "GPU-1111", "NVIDIA H100", 80 * GiB),
                               GPU(1, "GPU-2222", "NVIDIA H100", 80 * GiB)]
    usage = provider.usage(our_pids={600})
    assert usage == {
        "GPU-1111": GPUUsage(3 * GiB, 80 * GiB, [ForeignProcess(500, 2 * GiB)]),
        "GPU-2222": GPUUsage(0, 80 * GiB, []),
    }
    pool = GPUPool([g.uuid for g in provider.gpus()])
    pool.refresh(usage, our_pids={600})
    assert pool.free == ["GPU-2222"] and pool.busy_foreign() == {"GPU-1111": [500]}
    assert fake.calls == ["init"]  # NVML stays initialised for the provider's life
    provider.close()
    provider.close()
    assert fake.calls == ["init", "shutdown"]
    assert provider.usage() == {}


def test_nvml_discover_shuts_nvml_down(monkeypatch):
    monkeypatch.delenv("TUNED_FAKE_GPUS", raising=False)
    fake = _fake_pynvml(_devices())
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    assert [g.uuid for g in discover_gpus()] == ["GPU-1111", "GPU-2222"]
    assert fake.calls == ["init", "shutdown"]


def test_nvml_failure_after_init_is_no_information_with_one_log_line(caplog):
    devices = _devices()
    fake = _fake_pynvml(devices)
    provider = NVMLProvider(fake)
    devices[0]["fail"] = FakeNVMLError("GPU is lost")
    with caplog.at_level(logging.DEBUG):
        for _ in range(3):
            assert list(provider.usage()) == ["GPU-2222"]
    records = _gpu_log(caplog)
    assert len(records) == 1 and "GPU is lost" in records[0].getMessage()
    assert records[0].levelno == logging.WARNING
    del devices[0]["fail"]
    with caplog.at_level(logging.DEBUG):
        assert list(provider.usage()) == ["GPU-1111", "GPU-2222"]
    assert "again" in _gpu_log(caplog)[-1].getMessage()


def test_nvml_gpu_that_cannot_be_opened_is_left_out(caplog):
    devices = _devices()
    devices[0]["open_fail"] = FakeNVMLError("Insufficient Permissions")
    with caplog.at_level(logging.DEBUG):
        provider = NVMLProvider(_fake_pynvml(devices))
    assert [(g.index, g.uuid) for g in provider.gpus()] == [(1, "GPU-2222")]
    assert len(_gpu_log(caplog)) == 1 and "Insufficient Permissions" in caplog.text


def test_nvml_unknown_process_memory_keeps_the_gpu_busy():
    devices = _devices()
    devices[1]["processes"] = [(700, None)]
    provider = NVMLProvider(_fake_pynvml(devices))
    usage = provider.usage(our_pids={500, 600})
    assert usage["GPU-2222"].foreign == [ForeignProcess(700, None)]
    pool = GPUPool(["GPU-1111", "GPU-2222"])
    pool.refresh(usage)
    assert pool.free == ["GPU-1111"]


def test_hold_allocates_those_very_gpus_and_never_twice():
    pool = GPUPool(["GPU-a", "GPU-b", "GPU-c"])
    pool.refresh({"GPU-b": GPUUsage(0, GiB, [ForeignProcess(9, GiB)])})
    # An adopted trial keeps its GPUs, busy or not; a GPU this machine lost is left out.
    assert pool.hold(["GPU-b", "GPU-gone"]) == ["GPU-b"]
    assert pool.allocated == ["GPU-b"] and pool.free == ["GPU-a", "GPU-c"]
    with pytest.raises(ValueError, match="GPU-b"):
        pool.hold(["GPU-c", "GPU-b"])
    with pytest.raises(ValueError, match="GPU-c"):
        pool.hold(["GPU-c", "GPU-c"])
    assert pool.allocated == ["GPU-b"]  # nothing changed
    assert pool.take(2) == ["GPU-a", "GPU-c"]
    pool.give(["GPU-b"])
    assert pool.allocated == ["GPU-a", "GPU-c"]
