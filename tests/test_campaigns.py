"""Scale-out of fuzzing campaigns: local processes by default, Ray when asked."""

from __future__ import annotations

import importlib.util

import pytest

from pkvm.check.campaigns import merge, run_campaigns, split
from pkvm.check.fuzz import Campaign


def test_split_shares_the_steps_and_gives_each_campaign_its_seed_and_reproducer():
    parts = split(Campaign(seed=5, steps=101, out="r.toml"), 4)
    assert [p.seed for p in parts] == [5, 6, 7, 8]
    assert sum(p.steps for p in parts) == 101
    assert [p.out for p in parts] == [f"r-seed{s}.toml" for s in (5, 6, 7, 8)]


def test_processes_find_what_one_process_finds_and_merge_coverage(tmp_path):
    base = Campaign(seed=0, steps=300, out=str(tmp_path / "r.toml"), bugs=("load-no-pin",))
    parts = split(base, 2)
    together = run_campaigns(parts, jobs=2)
    alone = merge([p.run() for p in parts])
    assert [r.campaign.seed for r in together.found] == [r.campaign.seed for r in alone.found]
    assert together.found, "the seeded bug is found within 300 steps"
    assert together.calls == alone.calls  # the same deterministic streams, merged the same
    for r in together.found:
        assert (tmp_path / f"r-seed{r.campaign.seed}.toml").exists()


def test_clean_model_clean_across_processes():
    merged = run_campaigns(split(Campaign(seed=3, steps=400), 2), jobs=2)
    assert not merged.found and merged.steps_run == 400


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="Ray is not installed "
                    "(pip install 'pkvm[ray]')")
def test_ray_local_cluster():
    merged = run_campaigns(split(Campaign(seed=0, steps=200), 2), ray_address="local")
    assert merged.steps_run == 200 and not merged.found
