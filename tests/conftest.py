"""Shared pytest plumbing.

Each test item gets ``rep_setup`` / ``rep_call`` so fixtures can tell at
teardown whether the test failed (e.g. to save VM logs).
"""

from __future__ import annotations

import pytest


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):
    rep = yield
    setattr(item, f"rep_{rep.when}", rep)
    return rep
