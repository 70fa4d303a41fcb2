"""CPU time of process trees over an interval: the one place the benchmarks measure it.

    with TreeCPU({"llm": llm_pid, "router": router_pid}) as cpu:
        run_requests()
    cpu.seconds["llm"]        # user + system seconds of the llm's whole tree in the block
    cpu.by_role["llm"]        # the same split by process: {"api": .., "VLLM::EngineCore": ..}

A tree is the root process and all its descendants (children of children included), read with
psutil at the start and at the end of the interval. A process is known by (pid, create time), so
a reused pid is a new process. Processes present at both snapshots count their difference;
processes that appear meanwhile count from 0 (all their CPU falls inside the interval);
processes that exit meanwhile are lost (psutil cannot read a dead process) and are counted in
`vanished`. A tier's engine processes live as long as the tier, so nothing of size is lost.
`cloud-cost`, `demo` and `load` (hilm_vllm.lab.bench) use it; CPU seconds do not depend on what else
runs on the machine the way wall time does (beyond cache effects), so they are the fair cost
figure on a shared machine.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import psutil

from hilm_vllm.stack import _title as process_title

ROOT_ROLE = "api"  # the tree's root: the tier's API process (hilm-serve, vllm serve)

Key = tuple[int, float]  # (pid, create_time)


@dataclass(frozen=True)
class TreeSnapshot:
    """user + system CPU seconds of every process of one tree at one moment."""

    cpu_s: dict[Key, float]
    role: dict[Key, str]

    @property
    def total_s(self) -> float:
        return sum(self.cpu_s.values())


def snapshot(root_pid: int | None) -> TreeSnapshot | None:
    """The tree rooted at `root_pid` (None when that process is gone or `root_pid` is None)."""
    if root_pid is None:
        return None
    try:
        root = psutil.Process(root_pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return None
    cpu_s, role = {}, {}
    for i, p in enumerate(procs):
        try:
            with p.oneshot():
                t = p.cpu_times()
                key = (p.pid, p.create_time())
                cpu_s[key] = t.user + t.system
                role[key] = ROOT_ROLE if i == 0 else _title(p)
        except psutil.Error:  # exited between the listing and the read (or a zombie)
            continue
    return TreeSnapshot(cpu_s, role)


def _title(p: psutil.Process) -> str:
    return process_title(p)


def delta_by_role(before: TreeSnapshot, after: TreeSnapshot) -> dict[str, float]:
    """CPU seconds spent between two snapshots of one tree, per role (see the module)."""
    out: dict[str, float] = {}
    for key, t in after.cpu_s.items():
        spent = max(0.0, t - before.cpu_s.get(key, 0.0))
        role = after.role[key]
        out[role] = out.get(role, 0.0) + spent
    return out


def delta(before: TreeSnapshot | None, after: TreeSnapshot | None) -> float | None:
    """CPU seconds spent by the tree between two snapshots; None when either is missing."""
    if before is None or after is None:
        return None
    return sum(delta_by_role(before, after).values())


def vanished(before: TreeSnapshot | None, after: TreeSnapshot | None) -> int:
    """Processes of `before` that are gone at `after` (their last CPU is not counted)."""
    if before is None or after is None:
        return 0
    return len(before.cpu_s.keys() - after.cpu_s.keys())


@dataclass
class TreeCPU:
    """CPU seconds of several trees (name -> root pid, None: not measured) over a `with` block.
    After the block: `seconds[name]` (None when unmeasured or the root is gone), `by_role[name]`
    and `vanished[name]`."""

    roots: Mapping[str, int | None]
    before: dict[str, TreeSnapshot | None] = field(default_factory=dict)
    after: dict[str, TreeSnapshot | None] = field(default_factory=dict)

    def start(self) -> TreeCPU:
        self.before = {name: snapshot(pid) for name, pid in self.roots.items()}
        return self

    def stop(self) -> TreeCPU:
        self.after = {name: snapshot(pid) for name, pid in self.roots.items()}
        return self

    def __enter__(self) -> TreeCPU:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def seconds(self) -> dict[str, float | None]:
        return {n: delta(self.before.get(n), self.after.get(n)) for n in self.roots}

    @property
    def by_role(self) -> dict[str, dict[str, float] | None]:
        out = {}
        for n in self.roots:
            b, a = self.before.get(n), self.after.get(n)
            out[n] = None if b is None or a is None else delta_by_role(b, a)
        return out

    @property
    def vanished(self) -> dict[str, int]:
        return {n: vanished(self.before.get(n), self.after.get(n)) for n in self.roots}


def ms_per(seconds: float | None, count: float | None) -> float | None:
    """seconds * 1000 / count: CPU milliseconds per token (or per call); None when either is
    unknown or count is 0."""
    if seconds is None or not count:
        return None
    return seconds * 1e3 / count
