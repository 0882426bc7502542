"""The real-kernel side of ``pkvm conform``: run hypercall sequences on Linux's own pKVM.

A sequence is a list of :class:`RawStep`. :func:`run_sequences` boots the chosen Debian kernel
(``kvm-arm.mode=protected``) under QEMU with a busybox initramfs holding our module
(``module/pkvm_conform.c``); the initramfs ``/init`` loads it, feeds it the steps one by one and
prints each step's x0..x3. Many sequences share one boot (each gets its own page names); a
hyp panic ends the boot, so the steps after it are reported as not run and the next sequence
starts on a fresh boot.

    >>> from pkvm.conform.real import RawStep, run_sequences
    >>> [[r]] = run_sequences("7.2", [[RawStep("__pkvm_host_share_hyp", ("page:a",))]])
    >>> (r.x0, r.x1)
    (0, 0)

Arguments are ints (reduced modulo 2^64) or symbolic strings the module resolves on the real
machine: ``"page:NAME"`` (pfn of a zeroed page the module allocates for the sequence, the first of
four of ours),
``"pa:NAME"`` (its physical address), ``"va:NAME"`` (its kernel virtual address),
``"vm:NAME"`` (the hyp handle of a VM made by a :func:`vm_create` step of the sequence).
docs/conform.md has the whole story, timings included.
"""

from __future__ import annotations

import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from pkvm.conform.boot import (
    HYP_PANIC_RE,
    MARK,
    PANIC_RE,
    BootLog,
    RealError,
    prepare_snapshot,
    run_machine,
)
from pkvm.conform.setup import Kernel, SetupError, ensure_setup, load_kernel
from pkvm.conform.steps import (
    HOST_READ,
    MASK64,
    RawStep,
    RealResult,
    host_read,
    page_names,
    vm_create,
    vm_destroy,
    vm_run,
    vm_topup,
)

__all__ = [
    "BootLog",
    "RawStep",
    "RealError",
    "RealResult",
    "SetupError",
    "ensure_setup",
    "host_read",
    "hypercall_ids",
    "page_names",
    "prepare_snapshot",
    "run_sequences",
    "smccc_id",
    "vm_create",
    "vm_destroy",
    "vm_run",
    "vm_topup",
]

SMCCC_HOST_BASE = 0xC600_0000  # fast call, SMC64, owner "vendor hypervisor"


def signed(v: int) -> int:
    v &= MASK64
    return v - (1 << 64) if v >> 63 else v


def _encode_call(k: Kernel, call: str | int) -> str | None:
    """The module's spelling of a call, or None when this kernel's enum lacks the name."""
    if isinstance(call, bool) or not isinstance(call, (str, int)):
        raise TypeError(f"call must be a hypercall name or an int, not {call!r}")
    if isinstance(call, int):
        return hex(call & MASK64)
    if call in k.ids:
        return call
    if not re.fullmatch(r"__\w+", call):
        raise ValueError(f"{call!r} is not a host hypercall name")
    return None


def _encode_arg(a: int | str, seq: int) -> str:
    if isinstance(a, bool) or not isinstance(a, (int, str)):
        raise TypeError(f"hypercall argument must be an int or a symbolic string, not {a!r}")
    if isinstance(a, int):
        return hex(a & MASK64)
    if a.startswith("vm:"):  # VMs outlive a sequence in the module: scope their names
        return f"vm:{seq}.{a[3:]}"
    return a


def _vmm_command(st: RawStep, seq: int) -> str:
    name = f"{seq}.{str(st.args[0])[3:]}"
    rest = [str(int(x)) for x in st.args[1:]]
    op = str(st.call)[4:]
    return " ".join(["vmm", op, name, *rest])


@dataclass
class _Pending:
    seq: int  # index into the caller's list
    steps: list[RawStep]


SEQ_STEP = -1  # owner codes of the commands that answer no step
PAGE_STEP = -2


def _commands(k: Kernel, batch: list[_Pending]) -> tuple[list[str], list[tuple[int, int]]]:
    """The module commands of a batch, and for each the (sequence, step) it answers.

    Each sequence starts with ``seq`` and one ``page NAME`` per page it names (so its name ->
    pfn map is known even if a step panics). Steps whose call this kernel lacks are not sent:
    they answer as unknown calls without a boot.
    """
    cmds: list[str] = []
    owners: list[tuple[int, int]] = []
    for b, pend in enumerate(batch):
        cmds.append(f"seq {pend.seq}")
        owners.append((b, SEQ_STEP))
        for name in page_names(pend.steps):
            cmds.append(f"page {name}")
            owners.append((b, PAGE_STEP))
        for j, st in enumerate(pend.steps):
            if isinstance(st.call, str) and st.call.startswith("vmm:"):
                if k.helper is None:
                    raise RealError("this set-up has no VMM helper: VMM steps cannot run")
                cmds.append(_vmm_command(st, pend.seq))
                owners.append((b, j))
                continue
            if st.call == HOST_READ:
                cmds.append(f"read {int(st.cpu)} {str(st.args[0])[5:]}")
                owners.append((b, j))
                continue
            func = _encode_call(k, st.call)
            if func is None:
                continue
            args = " ".join(_encode_arg(a, pend.seq) for a in st.args)
            cmds.append(f"hvc {int(st.cpu)} {func} {args}".rstrip())
            owners.append((b, j))
    return cmds, owners


def parse_answer(line: str, console: str) -> dict[str, Any]:
    """One answer line; a kernel message printed into its middle is cut out."""
    if not line.strip():
        return {}
    m = re.search(r"\{.*\}", line)
    try:
        return dict(json.loads(m.group(0) if m else line))
    except json.JSONDecodeError as e:
        raise RealError(f"unreadable answer {line!r}:\n{console[-3000:]}") from e


def _regs(msg: dict[str, str], pages: dict[str, int], vas: dict[str, int]) -> RealResult:
    return RealResult(
        signed(int(msg["x0"], 16)),
        signed(int(msg["x1"], 16)),
        int(msg["x2"], 16) & MASK64,
        int(msg["x3"], 16) & MASK64,
        pages=pages,
        vas=vas,
    )


def _not_issued(k: Kernel, st: RawStep, pages: dict[str, int],
                vas: dict[str, int] | None = None) -> RealResult:
    """A name this kernel's enum lacks answers as an unknown call: x0 = -1, x1..x3 as passed."""
    vas = vas or {}
    regs = [a if isinstance(a, int) else _resolve(a, pages, vas)
            for a in (*st.args, 0, 0, 0)][:3]
    return RealResult(
        -1,
        signed(regs[0]),
        regs[1] & MASK64,
        regs[2] & MASK64,
        note=f"{st.call} is not a host hypercall of {k.release}: not issued",
        pages=pages,
        vas=vas,
    )


def _run_batch(
    k: Kernel, batch: list[_Pending], logs: list[BootLog], use_snapshot: bool
) -> tuple[dict[int, list[RealResult]], list[_Pending]]:
    """One fresh machine for ``batch``: results by sequence index, and the sequences left."""
    cmds, owners = _commands(k, batch)
    console, secs = run_machine(k, cmds, use_snapshot)
    logs.append(BootLog(k.profile, secs, len(batch), console))
    answers = [m.group(1) for m in re.finditer(rf"^{MARK} (.*)$", console, re.MULTILINE)]
    finished = f"{MARK}-END" in console

    results: dict[int, dict[int, RealResult]] = {b: {} for b in range(len(batch))}
    pages: dict[int, dict[str, int]] = {b: {} for b in range(len(batch))}
    vas: dict[int, dict[str, int]] = {b: {} for b in range(len(batch))}
    for (b, j), ans in zip(owners, answers, strict=False):
        if j == SEQ_STEP:
            continue
        msg = parse_answer(ans, console)
        if "error" in msg:
            raise RealError(f"module refused step {j} of sequence {batch[b].seq}: {msg['error']}")
        if not msg:
            raise RealError(f"no answer to step {j} of sequence {batch[b].seq}:\n{console[-3000:]}")
        if j == PAGE_STEP:
            pages[b].update({n: int(v, 16) for n, v in msg["pages"].items()})
            vas[b].update({n: int(v, 16) for n, v in msg.get("vas", {}).items()})
        else:
            results[b][j] = _regs(msg, pages[b], vas[b])

    dead_at: tuple[int, int] | None = None
    reason = ""
    if not finished:
        dead_at, reason = _death(k, batch, owners, answers, console)

    done: dict[int, list[RealResult]] = {}
    remaining: list[_Pending] = []
    for b, pend in enumerate(batch):
        if dead_at is not None and b > dead_at[0]:
            remaining.append(pend)
            continue
        seq_out: list[RealResult] = []
        for j, st in enumerate(pend.steps):
            if j in results[b]:
                seq_out.append(results[b][j])
            elif dead_at is not None and b == dead_at[0] and j == dead_at[1]:
                seq_out.append(RealResult(0, 0, 0, 0, panic=True, note=reason, pages=pages[b],
                                          vas=vas[b]))
            elif dead_at is not None and b == dead_at[0] and j > dead_at[1]:
                note = "not run: machine dead after panic"
                seq_out.append(RealResult(0, 0, 0, 0, panic=True, note=note, pages=pages[b],
                                          vas=vas[b], not_run=True))
            else:
                seq_out.append(_not_issued(k, st, pages[b], vas[b]))
        done[pend.seq] = seq_out
    return done, remaining


_LOCKUP_RE = re.compile(r"(hard LOCKUP|soft lockup|self-detected stall|rcu_preempt detected stalls"
                        r"|rcu_sched detected stalls|harness timeout)", re.IGNORECASE)


def _death(k: Kernel, batch: list[_Pending], owners: list[tuple[int, int]], answers: list[str],
           console: str) -> tuple[tuple[int, int], str]:
    """Where a batch that did not finish died, and how (the first step left unanswered)."""
    if len(answers) >= len(owners):
        raise RealError(f"boot ended before its end marker:\n{console[-3000:]}")
    dead_at = owners[len(answers)]
    if dead_at[1] < 0:
        raise RealError(f"boot died outside any step:\n{console[-3000:]}")
    panic = PANIC_RE.search(console)
    lockup = _LOCKUP_RE.search(console)
    if not panic and not lockup:
        raise RealError(
            f"boot of {k.release} died without a panic at sequence {batch[dead_at[0]].seq} "
            f"step {dead_at[1]}:\n{console[-3000:]}"
        )
    if panic:
        lines = [ln.strip() for ln in console.splitlines() if PANIC_RE.search(ln)]
        who = "hyp panic" if HYP_PANIC_RE.search(console) else "host kernel panic (EL1)"
    else:
        lines = [ln.strip() for ln in console.splitlines() if _LOCKUP_RE.search(ln)]
        who = "lockup"
    return dead_at, f"{who}: " + "; ".join(dict.fromkeys(lines))[:300]


def _resolve(a: str, pages: dict[str, int], vas: dict[str, int]) -> int:
    kind, name = a.split(":", 1)
    pfn = pages.get(name)
    if pfn is None:
        return 0
    if kind == "page":
        return pfn
    if kind == "va":
        return vas.get(name, 0)
    return pfn << 12 if kind == "pa" else 0  # vm: values are not reported back


def _run_chunk(
    k: Kernel, todo: list[_Pending], per_boot: int, use_snapshot: bool
) -> tuple[dict[int, list[RealResult]], list[BootLog]]:
    out: dict[int, list[RealResult]] = {}
    logs: list[BootLog] = []
    while todo:
        batch, todo = todo[:per_boot], todo[per_boot:]
        done, rest = _run_batch(k, batch, logs, use_snapshot)
        out.update(done)
        todo = rest + todo
    return out, logs


def run_sequences(
    kernel: str,
    seqs: list[list[RawStep]],
    *,
    per_boot: int = 256,
    jobs: int = 1,
    snapshot: bool = True,
    progress: bool = False,
    logs: list[BootLog] | None = None,
) -> list[list[RealResult]]:
    """Run each sequence on the real ``kernel`` ("6.12" | "7.2" | "latest"), in order.

    Sequences share boots (``per_boot`` at most; ``per_boot=1`` gives each a fresh machine);
    after a panic the rest start on a new boot. ``jobs`` > 1 splits the list into that many
    contiguous parts, each booted by its own QEMU at the same time. ``snapshot`` (default; env
    ``PKVM_CONFORM_SNAPSHOT=0`` turns it off): instead of booting, restore a QEMU snapshot
    taken once the kernel is up and the module loaded (made on first use, ~5x faster; any
    failure falls back to booting). Raises :class:`SetupError` when the
    harness cannot be set up here and :class:`RealError` when a boot fails for another reason.
    """
    k = load_kernel(kernel, progress)
    if os.environ.get("PKVM_CONFORM_SNAPSHOT", "1") == "0":
        snapshot = False
    for s in seqs:
        for st in s:
            if not isinstance(st, RawStep):
                raise TypeError(f"sequences hold RawStep, not {st!r}")
    if per_boot < 1 or jobs < 1:
        raise ValueError("per_boot and jobs must be at least 1")
    todo = [_Pending(i, list(s)) for i, s in enumerate(seqs)]
    n = max(1, min(jobs, len(todo)))
    size = -(-len(todo) // n) if todo else 0
    chunks = [todo[i : i + size] for i in range(0, len(todo), size)] if todo else []
    out: dict[int, list[RealResult]] = {}
    boot_logs = logs if logs is not None else []
    if len(chunks) <= 1:
        for chunk in chunks:
            done, chunk_logs = _run_chunk(k, chunk, per_boot, snapshot)
            out.update(done)
            boot_logs.extend(chunk_logs)
    else:
        with ThreadPoolExecutor(max_workers=len(chunks)) as pool:
            work = pool.map(lambda c: _run_chunk(k, c, per_boot, snapshot), chunks)
            for done, chunk_logs in work:
                out.update(done)
                boot_logs.extend(chunk_logs)
    return [out[i] for i in range(len(seqs))]


def hypercall_ids(kernel: str) -> dict[str, int]:
    """Host hypercall name -> index, from ``kernel``'s own ``enum __kvm_host_smccc_func``."""
    return dict(load_kernel(kernel, progress=False).ids)


def smccc_id(kernel: str, name: str) -> int:
    """The whole x0 of host hypercall ``name`` on ``kernel`` (from its own enum)."""
    k = load_kernel(kernel, progress=False)
    return SMCCC_HOST_BASE + k.ids[name]


# --- SMC conformance (pkvm.conform.smc): raw module commands on one fresh machine ------------
def run_module_commands(kernel: str, cmds: list[str], snapshot: bool = True) -> tuple[list[str], str]:
    """Send the module commands ``cmds`` (e.g. ``smc CPU IMM X0 .. X17``) to one fresh machine
    of ``kernel``: the answer lines in order (fewer than ``cmds`` if the machine died) and the
    console."""
    k = load_kernel(kernel, progress=False)
    use = snapshot and os.environ.get("PKVM_CONFORM_SNAPSHOT", "1") != "0"
    console, _ = run_machine(k, cmds, use)
    answers = [m.group(1) for m in re.finditer(rf"^{MARK} (.*)$", console, re.MULTILINE)]
    return answers, console
