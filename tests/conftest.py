import pytest

import pkvm


@pytest.fixture(params=["latest", "6.12"])
def machine(request):
    """A small booted machine of each profile."""
    return pkvm.Machine(memory="256M", cpus=2, abi=request.param)


@pytest.fixture
def m72():
    return pkvm.Machine(memory="256M", cpus=2, abi="latest")


@pytest.fixture
def m612():
    return pkvm.Machine(memory="256M", cpus=2, abi="6.12")
