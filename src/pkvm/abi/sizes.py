"""Sizes host and hyp agree on (`arch/arm64/include/asm/kvm_pkvm.h`, `hyp-constants.c`)."""

from __future__ import annotations

from typing import Final

from pkvm.arch.pte import KVM_PGTABLE_LAST_LEVEL, PTRS_PER_PTE
from pkvm.machine.memory import PAGE_SHIFT, PAGE_SIZE

KVM_MAX_PVMS: Final = 255
HANDLE_OFFSET: Final = 0x1000
KVM_PGTABLE_FIRST_LEVEL: Final = -1  # the worst case the sizing allows for (LPA2's level -1)
POINTER_SIZE: Final = 8  # sizeof(void *): the VM table is an array of pointers
HOST_S2_PGD_CONCAT_PAGES: Final = 16  # bounds the host stage-2's concatenated root tables
SZ_1G: Final = 1 << 30
SZ_2M: Final = 2 << 20

# Model choices: sizes that make donations span several pages.
PKVM_HYP_VM_SIZE: Final = 7680
PKVM_HYP_VCPU_SIZE: Final = 6144
# The model's 48-bit, 4-level stage-2: one root page, 3 table pages per new mapping at most.
KVM_PGTABLE_STAGE2_PGD_SIZE: Final = PAGE_SIZE
KVM_MMU_CACHE_MIN_PAGES: Final = 3
KVM_FFA_PROXY_PAGES: Final = 11  # mailboxes + descriptor buffer (the model's choice)


def page_align(size: int) -> int:
    return (size + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)


def div_round_up(n: int, d: int) -> int:
    return (n + d - 1) // d


def hyp_pgtable_max_pages(nr_pages: int) -> int:
    """`__hyp_pgtable_max_pages`: table pages to map `nr_pages` pages, one round per level."""
    total = 0
    for _level in range(KVM_PGTABLE_FIRST_LEVEL, KVM_PGTABLE_LAST_LEVEL + 1):
        nr_pages = div_round_up(nr_pages, PTRS_PER_PTE)
        total += nr_pages
    return total


def hyp_pgtable_total_pages(regions: list[tuple[int, int]]) -> int:
    return sum(hyp_pgtable_max_pages(size >> PAGE_SHIFT) for _base, size in regions)


def hyp_s1_pgtable_pages(regions: list[tuple[int, int]]) -> int:
    return hyp_pgtable_total_pages(regions) + hyp_pgtable_max_pages(SZ_1G >> PAGE_SHIFT)


def host_s2_pgtable_pages(regions: list[tuple[int, int]]) -> int:
    return (hyp_pgtable_total_pages(regions) + HOST_S2_PGD_CONCAT_PAGES
            + hyp_pgtable_max_pages(SZ_1G >> PAGE_SHIFT))


def hyp_vm_table_pages() -> int:
    return page_align(KVM_MAX_PVMS * POINTER_SIZE) >> PAGE_SHIFT


def hyp_vmemmap_pages(regions: list[tuple[int, int]], struct_hyp_page_size: int) -> int:
    total = 0
    for base, size in regions:
        start = ((base >> PAGE_SHIFT) * struct_hyp_page_size) & ~(PAGE_SIZE - 1)
        end = page_align(((base >> PAGE_SHIFT) + (size >> PAGE_SHIFT)) * struct_hyp_page_size)
        total += end - start
    return total >> PAGE_SHIFT


def hyp_ffa_proxy_pages() -> int:
    return KVM_FFA_PROXY_PAGES


def pkvm_selftest_pages() -> int:
    return 0  # CONFIG_NVHE_EL2_DEBUG=n in both profiles (the Debian builds of both kernels)


def kvm_hyp_reserve_pages(regions: list[tuple[int, int]], struct_hyp_page_size: int) -> int:
    """The total `kvm_hyp_reserve` sums, in pages (before rounding to 2 MiB)."""
    return (
        hyp_s1_pgtable_pages(regions)
        + host_s2_pgtable_pages(regions)
        + hyp_vm_table_pages()
        + hyp_vmemmap_pages(regions, struct_hyp_page_size)
        + hyp_ffa_proxy_pages()
        + pkvm_selftest_pages()
    )


def pkvm_get_hyp_vm_size(nr_vcpus: int) -> int:
    return PKVM_HYP_VM_SIZE + 8 * nr_vcpus
