"""The environment an engine tier's vLLM processes start with: set once, before the engine.

vLLM's engine core and worker are spawned processes that read their settings from the
environment they inherit, so `hilm-serve` settles three things in `os.environ` before it builds
the engine (each left alone when the user has set it):

- `HILM_ENGINE_BUSY_LOOP_MS` (`--engine-busy-loop-ms`): how long vLLM's shared-memory queue
  readers spin after each message (`patches/hilm_vllm_patches/shm_busy_loop.py`). On CPU the default is 0: engines
  there share cores with each other and with the tier's own API process, and a spinning reader
  takes the core from the engine that has work. Where the engine owns an accelerator vLLM's
  own 1 s stays (unset).
- `VLLM_USE_V2_MODEL_RUNNER=0` on GPU: the drafter's logits processor and the verifier's hook
  implement vLLM 0.32's V1 runner interface, and 0.32 picks Model Runner V2 on GPU.
- `VLLM_USE_FLASHINFER_SAMPLER=0` on GPU: the drafter's q must be exactly what its sampler
  drew from (vLLM's own top-k/top-p mask).
- `VLLM_CPU_OMP_THREADS_BIND`: which cores the engine's worker computes on. vLLM's `auto` binds
  every engine's worker to the same first core; `cpu_binding` gives co-located tiers their own
  cores (see `placement`; the launcher of the demo, the benchmarks and the tests applies it).
"""

from __future__ import annotations

import logging
import os

from hilm_vllm_patches.shm_busy_loop import ENV as BUSY_LOOP_ENV
from hilm_vllm_patches.shm_busy_loop import window_from_env
from hilm_vllm.tiers import MODEL_TIERS

logger = logging.getLogger("hilm.serve")

CPU_BUSY_LOOP_MS = 0.0  # engines that share cores: park at once, wake on the ZMQ notification
ENGINE_TIERS = tuple(t.value for t in MODEL_TIERS)

# The layouts `placement` knows. On 2 cores bench/round_cost.py measured them (docs/serving.md,
# "Placement"); `spread` is the default.
LAYOUTS = ("spread", "device-alone", "vllm", "nobind")


def busy_loop_ms(flag: float | None, is_cpu: bool, environ=os.environ) -> float | None:
    """The window for this engine: the flag, else the environment, else the platform default."""
    if flag is not None:
        if not 0 <= flag <= 60_000:
            raise ValueError(f"--engine-busy-loop-ms must be within [0, 60000], got {flag}")
        return float(flag)
    from_env = window_from_env(environ)
    if from_env is not None:
        return from_env * 1e3
    return CPU_BUSY_LOOP_MS if is_cpu else None


BIND_ENV = "VLLM_CPU_OMP_THREADS_BIND"


def rank_binding(binding: str | None, ranks: int, cpus: list[int]) -> str | None:
    """`VLLM_CPU_OMP_THREADS_BIND` for an engine of `ranks` CPU workers (tensor parallelism):
    vLLM's CPU backend wants one core list per rank, separated by `|` ("0|1"); its `auto` refuses
    to bind two workers on one NUMA node. The tier's cores (`binding`, else every core) are split
    into `ranks` contiguous groups; with fewer cores than ranks, ranks share them in turn. A
    binding that already names ranks, `nobind`, or one rank: unchanged (None)."""
    if ranks <= 1 or binding == "nobind" or (binding and "|" in binding):
        return None
    cores = cpus if not binding or binding == "auto" else [
        int(c) for part in binding.split(",") for c in _span(part)]
    if not cores:
        return None
    if len(cores) < ranks:
        return "|".join(str(cores[i % len(cores)]) for i in range(ranks))
    size, extra = divmod(len(cores), ranks)
    groups, start = [], 0
    for r in range(ranks):
        n = size + (1 if r < extra else 0)
        groups.append(",".join(map(str, cores[start:start + n])))
        start += n
    return "|".join(groups)


def _span(part: str) -> range:
    lo, _, hi = part.strip().partition("-")
    return range(int(lo), int(hi or lo) + 1)


def prepare(busy_loop_flag: float | None, environ=os.environ,
            tensor_parallel_size: int = 1) -> dict[str, str]:
    """Set what the engine processes must inherit; returns what was set (for the log)."""
    from vllm.platforms import current_platform

    is_cpu = current_platform.is_cpu()
    changed = {}
    if is_cpu:
        bind = rank_binding(environ.get(BIND_ENV), tensor_parallel_size, available_cpus())
        if bind is not None:
            changed[BIND_ENV] = bind
    window = busy_loop_ms(busy_loop_flag, is_cpu, environ)
    if window is not None:
        changed[BUSY_LOOP_ENV] = f"{window:g}"
    if not is_cpu and "VLLM_USE_V2_MODEL_RUNNER" not in environ:
        changed["VLLM_USE_V2_MODEL_RUNNER"] = "0"
    if not is_cpu and "VLLM_USE_FLASHINFER_SAMPLER" not in environ:
        # the drafter's q is vLLM's own top-k/top-p mask of the raw row; FlashInfer's sampler
        # draws by another route, which can pick a token that mask gives probability 0
        changed["VLLM_USE_FLASHINFER_SAMPLER"] = "0"
    environ.update(changed)
    for key, value in changed.items():
        logger.info("engine environment: %s=%s", key, value)
    return changed


def placement(tiers: list[str] | tuple[str, ...], cpus: list[int],
              layout: str = "spread") -> dict[str, str]:
    """`VLLM_CPU_OMP_THREADS_BIND` per engine tier for tiers co-located on `cpus`.

    - `spread`: every engine its own cores when there are enough (the LLM takes what is left
      over), else round-robin in the order slm, llm, ilm: on 2 cores the drafter has core 0 and
      the LLM core 1, the ILM shares the drafter's core (its turn comes while the drafter
      waits for a verification).
    - `device-alone`: the drafter alone on the first core, every verifier on the others.
    - `vllm`: vLLM's `auto` (every engine's worker on the same first core).
    - `nobind`: no binding; the OS schedules OpenMP threads on every core.
    """
    tiers = [t for t in tiers if t in ENGINE_TIERS]
    if layout not in LAYOUTS:
        raise ValueError(f"unknown placement {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if not cpus:
        raise ValueError("no CPUs to place the tiers on")
    if layout == "vllm":
        return {t: "auto" for t in tiers}
    if layout == "nobind":
        return {t: "nobind" for t in tiers}
    order = [t for t in ("slm", "llm", "ilm") if t in tiers]
    if layout == "device-alone" and len(cpus) >= 2:
        servers = ",".join(map(str, cpus[1:]))
        return {t: str(cpus[0]) if t == "slm" else servers for t in order}
    if len(cpus) >= len(order):
        out, rest = {}, list(cpus)
        for t in order:
            share = rest if t == order[-1] else rest[:1]
            if t == "llm" and t != order[-1]:  # the LLM gets every core the others leave
                share = rest[:len(rest) - (len(order) - 1 - order.index(t))]
            out[t], rest = ",".join(map(str, share)), rest[len(share):]
        return out
    return {t: str(cpus[i % len(cpus)]) for i, t in enumerate(order)}


def available_cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(
        range(os.cpu_count() or 1))
