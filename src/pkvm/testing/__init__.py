"""Helpers for testing code against the pkvm model: Hypothesis strategies and a pytest plugin.

    from hypothesis import given
    from pkvm.testing import strategies as pst

    @given(pfn=pst.pfns())
    def test_share_is_total(pkvm_machine, pfn):
        r = pkvm_machine.hvc(0, "__pkvm_host_share_hyp", pfn)
        assert r.x0 in (0, -1)

`pkvm_machine` comes from the pytest plugin (`pkvm.testing.plugin`, loaded automatically once
pkvm is installed). See `docs/scenarios.md` for the full example.
"""
