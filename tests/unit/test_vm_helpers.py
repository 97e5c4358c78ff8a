"""The VM tests' helper for in-guest programs, against canned SSH results."""

from __future__ import annotations

import pytest

from czone.guest.ssh import Result
from tests.vm.guest import run_program


class CannedVm:
    def __init__(self, rc: int, out: str):
        self.result = Result(rc, out, "")

    def ssh(self) -> CannedVm:
        return self

    def __enter__(self) -> CannedVm:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def run(self, cmd: str, timeout: float | None = None) -> Result:
        return self.result


def test_a_program_passes_with_its_summary_line() -> None:
    out = "PASS: one\nPASS: two\nOK: 0 failure(s)\n"
    assert run_program(CannedVm(0, out), "czone_place") == out


@pytest.mark.parametrize("rc, out", [
    (0, ""),                                          # exited 0, said nothing
    (0, "PASS: one\n"),                               # died before its summary
    (0, "PASS: one\nOK: 0 failure(s)\nPASS: late\n"),  # the summary is not last
    (0, "FAIL: one\nOK: 0 failure(s)\n"),
    (1, "PASS: one\nFAILED: 1 failure(s)\n"),
])
def test_a_program_without_a_clean_summary_fails(rc: int, out: str) -> None:
    with pytest.raises(AssertionError):
        run_program(CannedVm(rc, out), "czone_place")
