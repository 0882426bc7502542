"""Scale-out: many fuzzing campaigns at once, over local processes or a Ray cluster.

A campaign (`pkvm.check.fuzz.Campaign`) is one seeded step stream on its own machine; a
scale-out run gives each worker a campaign with its own seed (and its own reproducer file) and
merges what they found: coverage tables add up, every failure is kept with its reproducer.

Local processes are the default (`concurrent.futures`); with `ray_address` the campaigns become
Ray tasks on that cluster (`ray.init(address=...)`; "local" starts a private one). Ray is an
optional dependency: `pip install 'pkvm[ray]'`.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from pkvm.check.fuzz import Campaign, CampaignResult


def split(base: Campaign, n: int) -> list[Campaign]:
    """`n` campaigns sharing `base.steps`, with seeds base.seed, base.seed+1, ..."""
    each, extra = divmod(base.steps, n)
    out = []
    for i in range(n):
        name = None
        if base.out:
            stem, dot, ext = base.out.rpartition(".")
            name = f"{stem}-seed{base.seed + i}.{ext}" if dot else f"{base.out}-seed{base.seed + i}"
        out.append(dataclasses.replace(base, seed=base.seed + i, steps=each + (i < extra), out=name))
    return [c for c in out if c.steps]


def _run_one(c: Campaign) -> CampaignResult:
    return c.run()


@dataclass
class Merged:
    results: list[CampaignResult]
    calls: Counter[Any] = field(default_factory=Counter)
    transitions: Counter[Any] = field(default_factory=Counter)
    steps_run: int = 0
    raced: int = 0
    orphan_borrowed: int = 0  # as `RunResult.orphan_borrowed`
    panics: int = 0  # availability findings
    known_warns: Counter[Any] = field(default_factory=Counter)
    host_pointer_stores: Counter[Any] = field(default_factory=Counter)
    driver_errors: Counter[Any] = field(default_factory=Counter)
    seconds: float = 0.0  # summed over workers

    @property
    def found(self) -> list[CampaignResult]:
        return [r for r in self.results if r.found]


def merge(results: list[CampaignResult]) -> Merged:
    m = Merged(results)
    for r in results:
        m.calls.update(r.run.calls)
        m.transitions.update(r.run.transitions)
        m.steps_run += r.run.steps_run
        m.raced += r.run.raced
        m.orphan_borrowed += r.run.orphan_borrowed
        m.panics += len(r.run.panics)
        m.known_warns.update(r.run.known_warns)
        m.host_pointer_stores.update(r.run.host_pointer_stores)
        m.driver_errors.update(r.run.driver_errors)
        m.seconds += r.seconds
    return m


def run_campaigns(campaigns: list[Campaign], jobs: int = 1,
                  ray_address: str | None = None) -> Merged:
    """Run `campaigns` in parallel (processes, or Ray tasks) and merge their results."""
    if ray_address:
        try:
            import ray  # optional (pkvm[ray]): imported only when a cluster is given
        except ImportError as e:
            raise RuntimeError("--ray needs Ray: pip install 'pkvm[ray]'") from e
        if ray_address == "local":
            ray.init(ignore_reinit_error=True, include_dashboard=False)
        else:
            ray.init(address=ray_address, ignore_reinit_error=True)
        task = ray.remote(_run_one)
        return merge(ray.get([task.remote(c) for c in campaigns]))
    if jobs <= 1 or len(campaigns) == 1:
        return merge([c.run() for c in campaigns])
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        return merge(list(pool.map(_run_one, campaigns)))
