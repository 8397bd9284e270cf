"""Fixtures shared by the test modules."""

from __future__ import annotations

import pytest
from helpers import Daemon


@pytest.fixture
def daemon(tmp_path):
    """A `tuned serve` on temporary directories (`helpers.Daemon`); stopped after, and the
    trials it left running ended."""
    d = Daemon(tmp_path)
    d.start()
    yield d
    d.close()
