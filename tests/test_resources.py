"""The rule that shares CPUs and GPUs between experiments (`tuned.engine.resources`): the longest
waiter goes first, and what it cannot use is lent to the others."""

from __future__ import annotations

from tuned.engine.resources import ResourcePool


def _names(owner: object) -> str:
    return repr(owner)


def test_what_frees_up_is_held_for_the_longest_waiter():
    pool = ResourcePool(2)
    a, b = pool.take(1, 0, "a"), pool.take(1, 0, "b")
    assert a is not None and b is not None
    assert pool.take(2, 0, "big") is None  # big waits: needs 2, 0 free
    assert pool.wait_reason("big", _names) == "waiting: needs 2 CPUs, 0 free"
    pool.give(a)
    # The freed CPU is big's: 'a' may not take it back, though it fits.
    assert pool.take(1, 0, "a") is None
    assert pool.wait_reason("a", _names) == \
        "waiting: what is free is held for 'big', which waits longer"
    assert pool.wait_reason("big", _names) == "waiting: needs 2 CPUs, 1 free"
    pool.give(b)
    grant = pool.take(2, 0, "big")
    assert grant is not None and grant.cpus == 2 and pool.cpus_free == 0
    assert pool.head() == "a" and pool.wait_reason("big", _names) is None


def test_what_the_head_cannot_use_is_lent():
    pool = ResourcePool(2, ["GPU-0"])
    held = pool.take(1, 1, "gpu-a")
    assert held is not None
    assert pool.take(1, 1, "gpu-b") is None  # waits for the GPU; 1 CPU free
    # The head needs 1 CPU of the 1 free: none to lend.
    assert pool.take(1, 0, "cpu") is None
    pool.give(held)
    assert pool.take(1, 1, "gpu-b") is not None  # the head is served first
    assert pool.head() == "cpu" and pool.take(1, 0, "cpu") is not None


def test_cpus_beyond_the_heads_share_are_lent():
    pool = ResourcePool(4, ["GPU-0"])
    assert pool.take(1, 1, "gpu-a") is not None
    assert pool.take(1, 1, "gpu-b") is None  # head: needs the GPU and 1 of 3 free CPUs
    assert pool.take(2, 0, "cpu") is not None  # 2 of the 2 CPUs it does not need
    assert pool.take(1, 0, "cpu2") is None  # the last free CPU is the head's


def test_a_withdrawn_waiter_holds_nothing_and_owners_take_turns():
    pool = ResourcePool(1)
    first = pool.take(1, 0, "x")
    assert pool.take(1, 0, "y") is None and pool.waiting() == ["y"]
    pool.withdraw("y")
    pool.give(first)
    assert pool.waiting() == [] and pool.take(1, 0, "x") is not None
    # Both wait; x is served, y is next; x wanting more goes behind y.
    assert pool.take(1, 0, "y") is None
    assert pool.take(1, 0, "x") is None
    assert pool.waiting() == ["y", "x"]


def test_the_machine_capacity_is_named():
    pool = ResourcePool(2, ["GPU-0"])
    assert pool.fits_ever(2, 1) is None
    assert pool.fits_ever(4, 0) == "num_cpus: 4 per trial, but this machine has 2 CPUs"
    assert pool.fits_ever(1, 2) == "num_gpus: 2 per trial, but this machine has 1 GPU"
    assert pool.take(4, 0, "huge") is None
    assert pool.wait_reason("huge", _names) == \
        "waiting for ever: num_cpus: 4 per trial, but this machine has 2 CPUs"
    # It can never be served, so it holds nothing back from the others.
    assert pool.head() is None and pool.take(2, 0, "small") is not None


def test_a_caller_without_owner_skips_the_queue():
    pool = ResourcePool(1)
    assert pool.take(1, 0, "w") is not None
    assert pool.take(1, 0) is None and pool.waiting() == []
