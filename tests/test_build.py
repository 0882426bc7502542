"""The compiled build and the pure source (`setup.py`, `pkvm._compiled`): one model either way.

The suite runs twice in CI, pure (`PKVM_PURE=1`) and compiled; these tests check the switch
between the two, the guard against an extension older than its source, and that the hyp's
compiled classes pickle (a machine snapshot is a pickle).
"""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

import pkvm
from pkvm import _compiled
from pkvm.machine.memory import PhysMemory

SUFFIX = _compiled._SUFFIXES[0]


def test_pure_switch_loads_every_module_from_its_source():
    code = ("import pkvm, pkvm._compiled as c\n"
            "m = pkvm.Machine(memory='64M')\n"
            "assert m.hvc(0, '__pkvm_host_share_hyp', m.host.alloc_pages(1) >> 12).x1 == 0\n"
            "import pkvm.hyp.mem_protect as mp\n"
            "print(len(c.loaded()), mp.__file__.endswith('.py'), c.describe())")
    p = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PKVM_PURE": "1"},
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split(" ", 2) == ["0", "True", "pure Python (PKVM_PURE=1)\n"]


def test_this_process_runs_as_built():
    """Compiled where the install built extensions (and nothing asked for pure), else pure."""
    loaded = _compiled.loaded()
    if _compiled.extensions() and not _compiled.pure_reason:
        assert {"pkvm.hyp.mem_protect", "pkvm.hyp.state", "pkvm.arch.pgtable", "pkvm.inspect",
                "pkvm.check.invariants", "pkvm.check.ghost", "pkvm.machine.context",
                "pkvm.machine.stage2_view"} <= set(loaded)
        assert "pkvm.hyp.pgtable" not in loaded  # setup.py's PURE: a star re-export
        assert "pkvm.machine.uc_cp" not in loaded  # and a ctypes structure
        assert _compiled.describe().startswith("compiled with mypyc")
    else:
        assert loaded == [] and _compiled.describe().startswith("pure Python")


def test_an_extension_older_than_its_source_is_stale(tmp_path: Path):
    src, so = tmp_path / "mm.py", tmp_path / f"mm{SUFFIX}"
    src.write_text("x = 1\n")
    so.write_bytes(b"")
    os.utime(so, (1_000, 1_000))
    os.utime(src, (2_000, 2_000))  # edited after the build
    assert _compiled.stale({"pkg.mm": so}) == ["pkg.mm"]
    os.utime(so, (3_000, 3_000))  # built again
    assert _compiled.stale({"pkg.mm": so}) == []


def test_a_build_that_fell_back_warns_at_import(tmp_path: Path, monkeypatch):
    """setup.py leaves `_build_failed` when mypyc or the C build failed (pip hides its message
    without -v): a checkout without extensions then warns with the reason, and runs pure."""
    (tmp_path / "setup.py").write_text("")
    pkg = tmp_path / "src/pkvm"
    pkg.mkdir(parents=True)
    monkeypatch.setattr(_compiled, "PKG", pkg)
    monkeypatch.setattr(_compiled, "pure_reason", "")
    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))  # choose() adds its finder
    monkeypatch.delenv("PKVM_PURE", raising=False)
    _compiled.choose()
    assert _compiled.pure_reason == ""  # a clean checkout: no warning
    (pkg / "_build_failed").write_text("the C build failed (CompileError: gcc exit 1)\n")
    with pytest.warns(UserWarning, match="the last build fell back: the C build failed"):
        _compiled.choose()
    assert _compiled.pure_reason.startswith("the last build fell back")
    assert any(isinstance(f, _compiled._SourceFirst) for f in sys.meta_path)


class _SharedRam(pickle.Pickler):
    """Pickles a hyp object with the machine's RAM by reference (the RAM has its own reduce)."""

    def persistent_id(self, obj: object) -> str | None:
        return "ram" if isinstance(obj, PhysMemory) else None


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, mem: PhysMemory):
        super().__init__(io.BytesIO(data))
        self.mem = mem

    def persistent_load(self, pid: str) -> PhysMemory:
        assert pid == "ram"
        return self.mem


def _dumps(obj: object) -> bytes:
    f = io.BytesIO()
    _SharedRam(f).dump(obj)
    return f.getvalue()


@pytest.mark.parametrize("abi", ["latest", "6.12"])
def test_hyp_state_parts_pickle(abi):
    """The hyp's state objects, compiled or not, pickle and come back equal. (Not yet: the
    vmemmap, whose compiled class is made from the RAM it does not keep, and what
    `Machine.snapshot` handles itself: RAM, the life-cycle module, the page tables' callbacks.)"""
    m = pkvm.Machine(memory="64M", abi=abi)
    vm = m.host.create_vm(vcpus=1, protected=abi != "6.12", memory="8M")
    vm.map(0x40000, 1)
    h = m._hyp
    for name in ("carve", "locks", "pkvm_pgd_lock", "host_mmu_lock", "psci", "ffa",
                 "el2_tlb", "host_s2_tlb", "profile", "hyp_memory", "page_states"):
        obj = getattr(h, name)
        back = _Unpickler(_dumps(obj), h.mem).load()
        assert type(back) is type(obj), name
        assert _dumps(back) == _dumps(obj), name  # the same attributes, all the way down
    assert _Unpickler(_dumps(h.profile), h.mem).load() is h.profile  # a profile, by name
    tlb = _Unpickler(_dumps(h.host_s2_tlb), h.mem).load()
    assert tlb.entries == h.host_s2_tlb.entries and tlb.name == "host stage-2"
    lock = _Unpickler(_dumps(h.pkvm_pgd_lock), h.mem).load()
    assert (lock.name, lock.rank, lock.owner) == ("pkvm_pgd_lock", h.pkvm_pgd_lock.rank, None)


def test_a_fired_warn_pickles_with_its_site():
    from test_warn_panic import _gfn_meta_machine

    m, pfn = _gfn_meta_machine()
    with pytest.raises(pkvm.HypPanic):
        m.hvc(0, "__pkvm_host_donate_guest", pfn, 1 << 52)
    warn = m._hyp.warnings[0]
    back = pickle.loads(pickle.dumps(warn))
    assert (back.func, back.where, back.stack) == (warn.func, warn.where, warn.stack)
    assert back.func == "encode_gfn_meta" and "in encode_gfn_meta\n" in back.stack
