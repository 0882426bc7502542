"""The pkvm pytest plugin (entry point `pytest11: pkvm`).

Fixtures:

- `pkvm_machine`: a fresh booted machine (256 MiB, 2 CPUs, profile "latest"). Choose the profile
  with `@pytest.mark.parametrize("pkvm_abi", ["6.12", "latest"])`, or mark a test
  `@pytest.mark.pkvm(memory="1G", cpus=4, abi="6.12", check=True)` to pass any `Machine` keyword.
- `pkvm_abi`: the profile name `pkvm_machine` uses ("latest" unless parametrised).

Command-line option: `--pkvm-abi=6.12` changes the default profile of every `pkvm_machine`.

    def test_share_twice(pkvm_machine):
        pfn = pkvm_machine.host.alloc_pages(1) >> 12
        assert pkvm_machine.hvc(0, "__pkvm_host_share_hyp", pfn).x1 == 0
        assert pkvm_machine.hvc(0, "__pkvm_host_share_hyp", pfn).x1 == -1  # -EPERM
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from pkvm.board import Machine

DEFAULTS: dict[str, Any] = {"memory": "256M", "cpus": 2}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("pkvm")
    group.addoption("--pkvm-abi", default="latest",
                    help="ABI profile of the pkvm_machine fixture: 'latest' or '6.12'")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "pkvm(**kwargs): keyword arguments for the pkvm_machine fixture's Machine")


@pytest.fixture
def pkvm_abi(request: pytest.FixtureRequest) -> str:
    """The ABI profile of `pkvm_machine`; parametrise it to run a test on several profiles."""
    return str(request.config.getoption("--pkvm-abi", default="latest"))


@pytest.fixture
def pkvm_machine(request: pytest.FixtureRequest, pkvm_abi: str) -> Machine:
    """A booted, finalised `pkvm.Machine` (256 MiB, 2 CPUs unless a `pkvm` marker says)."""
    # Imported when a test asks for a machine: pytest loads this plugin in every session of
    # an environment where pkvm is installed, and most need no machine.
    import pkvm

    kwargs = dict(DEFAULTS, abi=pkvm_abi)
    marker = request.node.get_closest_marker("pkvm")
    if marker is not None:
        kwargs.update(marker.kwargs)
    return pkvm.Machine(**kwargs)
