"""Scenario files: a machine and a list of steps in TOML, each with an optional expectation.

    [machine]
    memory = "256M"
    abi = "latest"

    [[step]]
    hvc = "__pkvm_host_share_hyp"
    args = ["page:a"]
    expect = { ok = true }

`load(path)` parses and checks a file (errors name `file:line`), `Scenario.run()` plays it on a
fresh machine (or the one given) and returns a `Result`; `dump(steps, path)` writes one (the
fuzzer writes its reproducers this way). The format reference is `docs/scenarios.md`.
"""

from pkvm.machine.memory import PAGE_SHIFT
from pkvm.scenario.format import dump, load, loads, machine_value_error
from pkvm.scenario.run import Scenario, _Runner
from pkvm.scenario.steps import (
    ACTION_KEYS,
    ACTIONS,
    COMMON_KEYS,
    EXPECT_KEYS,
    MACHINE_DEFAULTS,
    MACHINE_KEYS,
    MAX_CPUS,
    MIN_MEMORY,
    SYMBOL,
    Result,
    ScenarioError,
    Step,
    StepResult,
)

__all__ = [
    "ACTIONS",
    "ACTION_KEYS",
    "COMMON_KEYS",
    "EXPECT_KEYS",
    "MACHINE_DEFAULTS",
    "MACHINE_KEYS",
    "MAX_CPUS",
    "MIN_MEMORY",
    "PAGE_SHIFT",
    "SYMBOL",
    "Result",
    "Scenario",
    "ScenarioError",
    "Step",
    "StepResult",
    "_Runner",
    "dump",
    "load",
    "loads",
    "machine_value_error",
]
