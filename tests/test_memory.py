"""Ownership and host<->hyp transitions, host aborts, the host stage-2 (memory.md §1.5, §2, §4).

Donation and pinning are EL2-internal: reached here through the hyp's own modules.
"""

import pytest

import pkvm
from conftest import EBUSY, EINVAL, EPERM, PAGE, hyp_region, ram_region, snapshot
from pkvm.hyp import mem_protect as mp
from pkvm.hyp.mm import hyp_va
from pkvm.hyp.panic import HypBug

SW0, SW1 = 1 << 55, 1 << 56


def donate(m, pfn, n=1):
    return mp.__pkvm_host_donate_hyp(m._hyp, pfn, n)


def reclaim(m, pfn, n=1):
    return mp.__pkvm_hyp_donate_host(m._hyp, pfn, n)


def pin(m, pa, size=PAGE):
    return mp.hyp_pin_shared_mem(m._hyp, hyp_va(pa), hyp_va(pa) + size)


def unpin(m, pa, size=PAGE):
    return mp.hyp_unpin_shared_mem(m._hyp, hyp_va(pa), hyp_va(pa) + size)


def leaf(m, table, addr):
    """The walk() record covering `addr` in a table, or None."""
    for e in m.inspect.walk(table):
        if e["addr"] <= addr < e["addr"] + e["size"]:
            return e
    return None


def counts_delta(before, after):
    keys = set(before) | set(after)
    return {k: after.get(k, 0) - before.get(k, 0) for k in keys if after.get(k, 0) != before.get(k, 0)}


# -- physical map ---------------------------------------------------------------------------
class TestMemoryMap:
    def test_regions(self, machine):
        mm = machine.memory_map()
        assert [r.kind for r in mm] == ["mmio", "ram", "hyp"]
        assert [r.start for r in mm] == sorted(r.start for r in mm)
        mmio, ram, hyp = mm
        assert (mmio.start, mmio.end) == (0, 0x4000_0000)
        assert (ram.start, ram.size) == (0x4000_0000, 256 << 20)
        for r in mm:
            assert r.end - r.start == r.size
        assert ram.start <= hyp.start < hyp.end <= ram.end
        assert hyp.size % (2 << 20) == 0
        assert hyp.end == ram.end - (6 << 20)
        import dataclasses

        with pytest.raises(dataclasses.FrozenInstanceError):
            mm[0].start = 5  # frozen

    def test_carveout_is_hyp_owned(self, machine):
        hyp = hyp_region(machine)
        counts = machine.inspect.page_counts()
        assert counts[("hyp", "OWNED")] == hyp.size // PAGE
        assert counts[("host", "OWNED")] == ram_region(machine).size // PAGE - hyp.size // PAGE
        for pfn in (hyp.start >> 12, (hyp.end >> 12) - 1):
            p = machine.inspect.page(pfn)
            assert (p.owner, p.host, p.hyp) == ("hyp", "NOPAGE", "OWNED")

    def test_not_ram_page(self, machine):
        p = machine.inspect.page(0x9000)
        assert p.owner is None

    @pytest.mark.parametrize("mem", ["32M", (64 << 20) - 4096, "63M", 100, (64 << 20) + 1])
    def test_too_small(self, mem):
        with pytest.raises(ValueError):
            pkvm.Machine(memory=mem, cpus=1)

    def test_size_strings(self):
        m = pkvm.Machine(memory="65536K", cpus=1, abi="6.12")
        assert ram_region(m).size == 64 << 20
        assert hyp_region(m).start > 0x4000_0000


# -- the host's pages -----------------------------------------------------------------------
class TestHostPages:
    def test_alloc_pages(self, machine):
        h = machine.host
        pa = h.alloc_pages(3)
        assert pa >= 0x4000_0000 + 2 * PAGE
        assert h.read(pa, 3 * PAGE) == bytes(3 * PAGE)
        hyp = hyp_region(machine)
        assert not (hyp.start - 3 * PAGE < pa < hyp.end)
        h.write(pa, b"hello")
        h.free_pages(pa, 3)
        pa2 = h.alloc_pages(1)
        assert h.read(pa2, PAGE) == bytes(PAGE)  # zeroed again

    def test_alloc_exhausted_and_bad_free(self, machine):
        with pytest.raises(MemoryError):
            machine.host.alloc_pages(1 << 20)
        with pytest.raises(ValueError):
            machine.host.free_pages(0x4000_0000)
        with pytest.raises(ValueError):
            machine.host.alloc_pages(0)

    def test_mmio_reads_zero_writes_dropped(self, machine):
        h = machine.host
        h.write(0x0900_0000, b"abc")
        assert h.read(0x0900_0000, 4) == bytes(4)
        e = leaf(machine, "host", 0x0900_0000)
        assert e is not None and e["valid"] and e["out"] == e["addr"]

    def test_read_write_roundtrip(self, machine):
        pa = machine.host.alloc_pages(2)
        data = bytes(range(256)) * 20
        machine.host.write(pa + 100, data)
        assert machine.host.read(pa + 100, len(data)) == data


# -- the host stage-2 ----------------------------------------------------------------------
class TestHostStage2:
    def test_block_mapping_on_first_touch(self, machine):
        m = machine
        pa = 0x4000_0000 + (16 << 20) + 5 * PAGE
        assert leaf(m, "host", pa) is None or not leaf(m, "host", pa)["valid"]
        m.host.read(pa, 8)
        e = leaf(m, "host", pa)
        assert e["valid"] and e["level"] == 2 and e["size"] == 2 << 20
        assert e["addr"] == pa & ~((2 << 20) - 1) and e["out"] == e["addr"]
        assert e["prot"] & 0xF == 0xF  # RWX

    def test_mmio_block_on_first_touch(self, machine):
        m = machine
        m.host.read(0x0900_0000, 4)
        e = leaf(m, "host", 0x0900_0000)
        assert e["level"] == 1 and e["addr"] == 0 and e["size"] == 1 << 30
        assert e["prot"] & 0xC == 0xC and not e["prot"] & 3  # RW, not executable

    def test_high_mmio_granule(self, machine):
        # 6.12 does not skip level 0: the 512 GiB granule is mapped, as 1 GiB blocks
        m = machine
        m.host.read(0x80_0000_0000 + 0x1234000, 8)
        w = [e for e in m.inspect.walk("host") if 0x80_0000_0000 <= e["addr"] < 0x100_0000_0000]
        assert {e["level"] for e in w} == {1}
        assert all(e["valid"] and e["out"] == e["addr"] for e in w)
        assert len(w) == (512 if m.abi == "6.12" else 1)

    def test_gap_above_ram_granule(self, machine):
        # the 1 GiB granule around 0x5000_0000 overlaps RAM: a 2 MiB block of the gap
        m = machine
        m.host.read(0x5000_0000, 8)
        e = leaf(m, "host", 0x5000_0000)
        assert (e["addr"], e["level"], e["valid"]) == (0x5000_0000, 2, True)

    def test_shared_page_mapping(self, machine):
        m = machine
        pa = 0x4000_0000 + (20 << 20) + 7 * PAGE
        m.host.read(pa, 8)  # block first
        assert m.hvc(0, "__pkvm_host_share_hyp", pa >> 12).x1 == 0
        e = leaf(m, "host", pa)
        assert e["valid"]
        if m.abi == "6.12":
            assert e["level"] == 3
            assert e["pte"] & (SW0 | SW1) == SW0  # SHARED_OWNED in the PTE
        else:
            assert e["level"] == 2  # 7.2 keeps states in the vmemmap: the block stays
        # the rest of the block is still readable by the host
        m.host.read(pa + PAGE, 8)
        m.host.read(pa, 8)
        m.host.write(pa, b"shared")
        assert m.host.read(pa, 6) == b"shared"

    def test_carveout_annotation(self, machine):
        m = machine
        pa = hyp_region(m).start
        e = leaf(m, "host", pa)
        assert e is not None and not e["valid"] and e["level"] == 3
        if m.abi == "6.12":
            assert e["pte"] == 0x4
        else:
            assert e["pte"] == 0x2000_0000_0000_0002
        assert m.inspect.host_annotation(pa)[0] == 1  # owner HYP


# -- host aborts ----------------------------------------------------------------------------
class TestHostAbort:
    @pytest.mark.parametrize("write", [False, True])
    def test_carveout_access(self, machine, write):
        m = machine
        pa = hyp_region(m).start + 3 * PAGE
        before = snapshot(m)
        with pytest.raises(pkvm.HostDataAbort) as ei:
            if write:
                m.host.write(pa + 8, b"x")
            else:
                m.host.read(pa + 8, 1)
        assert ei.value.addr >> 12 == pa >> 12
        assert ei.value.write == write
        if m.abi == "6.12":
            assert ei.value.fatal is True
            assert m.dead
            with pytest.raises(pkvm.HypPanic):
                m.hvc(0, "__kvm_flush_vm_context")
            with pytest.raises(pkvm.HypPanic):
                m.host.read(0x4000_0000 + (8 << 20), 1)
        else:
            assert ei.value.fatal is False
            assert not m.dead
            assert snapshot(m) == before
            assert m.hvc(0, "__kvm_flush_vm_context").x0 == 0

    def test_partial_access_changes_nothing(self, m72):
        m = m72
        hyp = hyp_region(m)
        pa = hyp.start - PAGE  # last host page before the carve-out
        m.host.write(pa, b"\x11" * PAGE)
        with pytest.raises(pkvm.HostDataAbort) as ei:
            m.host.write(pa + PAGE - 4, b"\x22" * 8)
        assert ei.value.addr == hyp.start
        assert m.host.read(pa, PAGE) == b"\x11" * PAGE

    def test_donated_page_abort(self, machine):
        m = machine
        pa = m.host.alloc_pages(1)
        assert donate(m, pa >> 12) == 0
        with pytest.raises(pkvm.HostDataAbort) as ei:
            m.host.read(pa, 4)
        assert ei.value.fatal == (m.abi == "6.12")


# -- host <-> hyp transitions -----------------------------------------------------------------
class TestShare:
    def test_share_states_and_counts(self, machine):
        m = machine
        pa = m.host.alloc_pages(1)
        before = m.inspect.page_counts()
        assert m.hvc(0, "__pkvm_host_share_hyp", pa >> 12).x1 == 0
        p = m.inspect.page(pa >> 12)
        assert (p.owner, p.host, p.hyp, p.refcount) == ("host", "SHARED_OWNED", "SHARED_BORROWED", 0)
        assert counts_delta(before, m.inspect.page_counts()) == {
            ("host", "OWNED"): -1, ("host", "SHARED_OWNED"): 1, ("hyp", "SHARED_BORROWED"): 1}
        e = leaf(m, "hyp", hyp_va(pa))
        if m.abi == "6.12":
            assert e is not None and e["valid"] and e["pte"] & (SW0 | SW1) == SW1
        else:
            assert e is None  # 7.2: mapped at EL2 only while pinned
        assert m.hvc(0, "__pkvm_host_unshare_hyp", pa >> 12).x1 == 0
        assert m.inspect.page_counts() == before
        assert leaf(m, "hyp", hyp_va(pa)) is None
        e = leaf(m, "host", pa)
        if m.abi == "6.12":
            assert e["valid"] and e["level"] == 3 and not e["pte"] & (SW0 | SW1)

    def test_share_of_donated_page(self, machine):
        m = machine
        pfn = m.host.alloc_pages(1) >> 12
        assert donate(m, pfn) == 0
        before = snapshot(m)
        assert m.hvc(0, "__pkvm_host_share_hyp", pfn).x1 == -EPERM
        assert m.hvc(0, "__pkvm_host_unshare_hyp", pfn).x1 == -EPERM
        assert snapshot(m) == before

    def test_many_pages(self, machine):
        m = machine
        pa = m.host.alloc_pages(8)
        before = m.inspect.page_counts()
        for k in range(8):
            assert m.hvc(k % 2, "__pkvm_host_share_hyp", (pa >> 12) + k).x1 == 0
        assert m.inspect.page_counts()[("host", "SHARED_OWNED")] == 8
        for k in reversed(range(8)):
            assert m.hvc(0, "__pkvm_host_unshare_hyp", (pa >> 12) + k).x1 == 0
        assert m.inspect.page_counts() == before


class TestDonate:
    def test_donate_and_back(self, machine):
        m = machine
        pa = m.host.alloc_pages(3)
        m.host.write(pa, b"keep")
        before = m.inspect.page_counts()
        assert donate(m, pa >> 12, 3) == 0
        for k in range(3):
            p = m.inspect.page((pa >> 12) + k)
            assert (p.owner, p.host, p.hyp) == ("hyp", "NOPAGE", "OWNED")
        assert counts_delta(before, m.inspect.page_counts()) == {
            ("host", "OWNED"): -3, ("hyp", "OWNED"): 3}
        e = leaf(m, "hyp", hyp_va(pa))
        assert e["valid"] and e["out"] == pa
        ann = m.inspect.host_annotation(pa)
        assert ann is not None and ann[0] == 1
        # a second donation of the same pages is refused
        snap = snapshot(m)
        assert donate(m, pa >> 12, 1) == -EPERM
        assert snapshot(m) == snap
        assert reclaim(m, pa >> 12, 3) == 0
        assert m.inspect.page_counts() == before
        e = leaf(m, "host", pa)
        if m.abi == "6.12":
            assert e is None  # a zero leaf: faults back in lazily
        else:
            assert e["valid"] and e["level"] == 3 and e["out"] == pa  # RWX identity map
        assert m.inspect.host_annotation(pa) is None
        assert m.host.read(pa, 4) == b"keep"  # donation does not wipe
        assert reclaim(m, pa >> 12, 1) == -EPERM

    def test_donate_partially_foreign_range(self, machine):
        m = machine
        pa = m.host.alloc_pages(2)
        assert m.hvc(0, "__pkvm_host_share_hyp", (pa >> 12) + 1).x1 == 0
        before = snapshot(m)
        assert donate(m, pa >> 12, 2) == -EPERM
        assert snapshot(m) == before

    def test_donate_carveout_and_mmio(self, machine):
        m = machine
        before = snapshot(m)
        assert donate(m, hyp_region(m).start >> 12) == -EPERM
        assert donate(m, 0x9000) == -EPERM
        assert reclaim(m, m.host.alloc_pages(1) >> 12) == -EPERM
        after = snapshot(m)
        assert after["counts"] == before["counts"]

    def test_7_2_pfn_range_invalid(self, m72):
        m = m72
        before = snapshot(m)
        assert donate(m, 1 << 36) == -EINVAL
        assert donate(m, (1 << 36) - 1, 2) == -EINVAL
        assert reclaim(m, 1 << 36) == -EINVAL
        assert snapshot(m) == before

    def test_7_2_zero_pages_at_region_start(self, m72):
        assert donate(m72, 0x40000, 0) == -EINVAL

    def test_zero_pages_elsewhere(self, machine):
        m = machine
        pfn = m.host.alloc_pages(1) >> 12
        before = m.inspect.page_counts()
        assert donate(m, pfn, 0) == 0
        assert m.inspect.page_counts() == before

    def test_host_reaccess_after_reclaim(self, machine):
        m = machine
        pa = m.host.alloc_pages(1)
        assert donate(m, pa >> 12) == 0
        assert reclaim(m, pa >> 12) == 0
        m.host.write(pa, b"ok")
        assert m.host.read(pa, 2) == b"ok"


class TestPin:
    def test_pin_requires_share(self, machine):
        m = machine
        pa = m.host.alloc_pages(1)
        before = snapshot(m)
        assert pin(m, pa) == -EPERM
        assert snapshot(m) == before
        assert pin(m, hyp_region(m).start) == -EPERM

    def test_pin_unpin(self, machine):
        m = machine
        pa = m.host.alloc_pages(1)
        assert m.hvc(0, "__pkvm_host_share_hyp", pa >> 12).x1 == 0
        assert pin(m, pa) == 0
        assert pin(m, pa + 100, 8) == 0  # widened to the page
        assert m.inspect.page(pa >> 12).refcount == 2
        e = leaf(m, "hyp", hyp_va(pa))
        assert e is not None and e["valid"] and e["out"] == pa
        before = snapshot(m)
        r = m.hvc(0, "__pkvm_host_unshare_hyp", pa >> 12)
        assert (r.x0, r.x1) == (0, -EBUSY)
        assert snapshot(m) == before
        unpin(m, pa)
        assert m.hvc(0, "__pkvm_host_unshare_hyp", pa >> 12).x1 == -EBUSY
        unpin(m, pa)
        assert m.inspect.page(pa >> 12).refcount == 0
        if m.abi == "latest":
            assert leaf(m, "hyp", hyp_va(pa)) is None  # last unpin unmaps
        assert m.hvc(0, "__pkvm_host_unshare_hyp", pa >> 12).x1 == 0

    def test_pin_multi_page(self, machine):
        m = machine
        pa = m.host.alloc_pages(2)
        assert m.hvc(0, "__pkvm_host_share_hyp", pa >> 12).x1 == 0
        before = snapshot(m)
        # second page not shared: the whole pin is refused
        assert pin(m, pa + PAGE - 8, 16) == -EPERM
        assert snapshot(m) == before
        assert m.hvc(0, "__pkvm_host_share_hyp", (pa >> 12) + 1).x1 == 0
        assert pin(m, pa + PAGE - 8, 16) == 0
        assert m.inspect.page(pa >> 12).refcount == 1
        assert m.inspect.page((pa >> 12) + 1).refcount == 1
        unpin(m, pa + PAGE - 8, 16)
        assert m.inspect.page(pa >> 12).refcount == 0

    def test_unpin_underflow_is_bug(self, machine):
        m = machine
        pa = m.host.alloc_pages(1)
        assert m.hvc(0, "__pkvm_host_share_hyp", pa >> 12).x1 == 0
        with pytest.raises(HypBug):
            unpin(m, pa)

    def test_7_2_donate_back_pinned_is_ebusy(self, m72):
        # a hyp-owned page with a non-zero refcount cannot go back to the host
        m = m72
        pa = m.host.alloc_pages(1)
        assert donate(m, pa >> 12) == 0
        h = m._hyp
        h.vmemmap.refcount[h.vmemmap.idx(pa)] = 1
        assert reclaim(m, pa >> 12) == -EBUSY
        h.vmemmap.refcount[h.vmemmap.idx(pa)] = 0
        assert reclaim(m, pa >> 12) == 0


class TestRefusalsChangeNothing:
    def test_sweep(self, machine):
        m = machine
        pa = m.host.alloc_pages(2)
        pfn = pa >> 12
        assert m.hvc(0, "__pkvm_host_share_hyp", pfn).x1 == 0
        assert donate(m, pfn + 1) == 0
        calls = [
            ("__pkvm_host_share_hyp", pfn), ("__pkvm_host_share_hyp", pfn + 1),
            ("__pkvm_host_unshare_hyp", pfn + 1), ("__pkvm_host_unshare_hyp", pfn + 2),
            ("__pkvm_host_share_hyp", hyp_region(m).start >> 12),
            ("__pkvm_host_share_hyp", 0x7FFFFFFFF), ("__pkvm_host_share_hyp", 1 << 40),
            ("__pkvm_prot_finalize",), ("__pkvm_init", 0, 0), (0x8400_0000,),
            ("__pkvm_init_vm", 0, 0, 0),
        ]
        before = snapshot(m)
        for c in calls:
            r = m.hvc(1, *c)
            assert r.x0 == -1 or r.x1 != 0, c
            assert snapshot(m) == before, c
