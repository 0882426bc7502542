"""A pytest plugin: watch every machine any test makes with `pkvm.check.hw_oracles`.

    PYTHONPATH=tests .venv/bin/python -m pytest -p hw_oracle_guard -m "not conform and not linux"

Each test fails if any oracle reported a finding on one of its machines after any hypercall,
except machines a test built with a seeded bug switched on, or whose host stage-2 TLBI a test
took out (`test_tlb.py`): those are meant to trip them.
"""

from __future__ import annotations

import pytest

import pkvm.board
from pkvm.check import hw_oracles

_found: list[str] = []


def _clean_findings(m: pkvm.board.Machine) -> list[str]:
    if m.inspect.table("host").tlbi is None:
        return []  # not the clean model: a test removed the TLBI on purpose
    return hw_oracles.violations(m.inspect)


@pytest.fixture(autouse=True)
def _hw_oracle_guard(monkeypatch):
    init = pkvm.board.Machine.__init__

    def watched(self, *args, **kwargs):
        init(self, *args, **kwargs)
        if not self._hyp.seeded_bugs:
            self.listeners.append(lambda rec: _found.extend(_clean_findings(self)))

    monkeypatch.setattr(pkvm.board.Machine, "__init__", watched)
    _found.clear()
    yield
    found = sorted(set(_found))
    _found.clear()
    assert not found, "hardware oracles tripped on the clean model:\n" + "\n".join(found[:10])
