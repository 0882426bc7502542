"""Where the real-kernel side keeps what it fetches and builds, and its set-up error.

Everything lives outside the repository: ``$PKVM_CACHE/conform``, default
``~/.cache/pkvm/conform``, with one private apt (:mod:`pkvm.debian`) per Debian suite. Shared
by :mod:`pkvm.conform.setup` and :mod:`pkvm.conform.qemu`.
"""

from __future__ import annotations

import os
from pathlib import Path

from pkvm.debian import PrivateApt

__all__ = ["SetupError", "cache_root", "private_apt"]

APT_ARCHS = ("arm64", "amd64")  # arm64 kernels and busybox; amd64 kbuild tools, glibc, QEMU


class SetupError(RuntimeError):
    """The real-kernel harness cannot be set up here (the message says why and what to do)."""


def cache_root() -> Path:
    base = os.environ.get("PKVM_CACHE")
    root = Path(base) if base else Path.home() / ".cache" / "pkvm"
    return root / "conform"


def private_apt(suite: str, native: str = "arm64") -> PrivateApt:
    """The harness's private apt for ``suite`` (one per suite in the cache, whatever it
    fetches)."""
    return PrivateApt(cache_root() / f"apt-{suite}", suite, native=native, archs=APT_ARCHS)
