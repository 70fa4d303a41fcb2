"""What one round costs on co-located tiers: a drafter and a verifier on the same machine.

    .venv/bin/python bench/round_cost.py                      # demo zoo, every setting below
    .venv/bin/python bench/round_cost.py --zoo tiny --repeats 5 --load-s 5

For each setting (engine placement x shm busy-loop window) it launches the SLM and LLM tiers of
the zoo, then measures through their gRPC services, network model off:

  draft_ms_idle          a Draft of --block tokens after --idle-s of silence (median)
  verify_ms_idle         a Verify of --block drafted tokens after --idle-s of silence
  verify_ms_after_draft  the same Verify issued the moment its Draft returns (what a round does)
  draft_calls_per_s      {"1": ..., "8": ...}: Drafts per second in aggregate, N sessions each
                         drafting back to back for --load-s (each Draft cuts its session back, so
                         every call drafts the same length from the same context length)
  verify_calls_per_s     the same for Verify calls of --block tokens

Settings: `default` is what hilm-serve does today (placement `spread`, window 0 on CPU);
`vllm-spin` is vLLM's own behaviour (every worker bound to the first core, 1 s busy loop) —
the "before" of the round-cost issue; the others vary one of the two. Timings are ratios within
one run: the machine is shared and noisy.

Writes bench/results/round_cost-<UTC>.json: config, git_commit, machine, and under `results`
the default setting's figures (the keys above) and every setting's under `results.settings`,
plus a PNG of the latencies and call rates per setting.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path


from hilm_vllm.benchjson import write_result
from hilm_vllm.drafter.client import DrafterClient
from hilm_vllm.launch import TierProcess, exit_on_sigterm
from hilm_vllm.sampling import SamplingSpec
from hilm_vllm.verifier.client import VerifierClient
from hilm_vllm.bench import add_common_args

# name -> (placement layout, --engine-busy-loop-ms or None for hilm-serve's default)
SETTINGS = {
    "default": ("spread", None),
    "vllm-spin": ("vllm", 1000.0),
    "spread-spin": ("spread", 1000.0),
    "vllm-nospin": ("vllm", 0.0),
    "nobind-nospin": ("nobind", 0.0),
}
PROMPT = "import os\nimport sys\n\n\ndef main(argv):\n    parser = "


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, "model family of the SLM and LLM")
    p.add_argument("--settings", default=",".join(SETTINGS),
                   help=f"comma-separated, of: {', '.join(SETTINGS)} (default: all)")
    p.add_argument("--block", type=int, default=4, help="draft tokens per call (default: 4)")
    p.add_argument("--repeats", type=int, default=8, help="timed calls per latency (default: 8)")
    p.add_argument("--idle-s", type=float, default=1.3,
                   help="silence before an idle call; > vLLM's 1 s spin (default: 1.3)")
    p.add_argument("--load-s", type=float, default=8.0,
                   help="seconds of back-to-back calls per rate (default: 8)")
    p.add_argument("--sessions", default="1,8", help="session counts for the rates (default: 1,8)")
    args = p.parse_args(argv)
    unknown = set(args.settings.split(",")) - set(SETTINGS)
    if unknown:
        p.error(f"unknown settings {sorted(unknown)}; choose from {', '.join(SETTINGS)}")
    return args


def engine_flags(tier: str, zoo, busy_loop_ms: float | None) -> list[str]:
    from hilm_vllm.stack import config_path

    flags = ["--model", str(zoo.model(tier)),
             "--config", str(config_path(f"engine_configs/demo-{tier}.yaml")),
             "--port", "0", "--metrics-port", "0"]
    if busy_loop_ms is not None:
        flags += ["--engine-busy-loop-ms", f"{busy_loop_ms:g}"]
    return flags


class Pair:
    """A drafter session and a verifier session on the same prompt, cut back every call."""

    def __init__(self, slm: DrafterClient, llm: VerifierClient, block: int, seed: int):
        """`seed`: the verifier session's (its acceptance draws)."""
        self.slm, self.llm, self.block, self.seed = slm, llm, block, seed

    async def open(self) -> Pair:
        # Unseeded: every Draft samples afresh. A verifier replays a call identical to its last
        # one (a client's retry) without the engine, so Verify calls alternate between two
        # blocks (`variant`) and never repeat the previous call.
        self.d = await self.slm.open_session(PROMPT, SamplingSpec(temperature=1.0))
        self.v = await self.llm.open_session(list(self.d.prompt_token_ids),
                                             SamplingSpec(temperature=1.0, seed=self.seed))
        self.base, self.d_at, self.v_at = self.d.position, self.d.position, self.v.position
        return self

    async def draft(self):
        r = await self.slm.draft(self.d.session_id, self.d_at, self.block,
                                 rollback_to=self.base if self.d_at > self.base else None)
        self.d_at = r.position
        return r

    async def verify(self, block):
        """Verify a block: a DraftResult's tokens, or a list of (token, (ids, probs))."""
        if hasattr(block, "tokens"):
            block = [(t.token_id, (t.ids, t.probs)) for t in block.tokens]
        r = await self.llm.verify(self.v.session_id, self.v_at, [t for t, _ in block],
                                  [d for _, d in block],
                                  rollback_to=self.base if self.v_at > self.base else None)
        self.v_at = r.position
        return r


    async def close(self) -> None:
        await self.slm.close_session(self.d.session_id)
        await self.llm.close_session(self.v.session_id)


def variant(drafted) -> list:
    """The drafted block with its last token swapped for another one of its support (the same
    size of work for the verifier, a different call)."""
    block = [(t.token_id, (t.ids, t.probs)) for t in drafted.tokens]
    token, (ids, probs) = block[-1]
    other = next((int(i) for i in ids if int(i) != token), token)
    return block[:-1] + [(other, (ids, probs))]


async def timed(coro) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = await coro
    return (time.perf_counter() - t0) * 1e3, out


async def latencies(pair: Pair, args) -> dict:
    draft_idle, verify_idle, verify_after = [], [], []
    drafted = await pair.draft()
    await pair.verify(drafted)  # warm both sessions' prefix caches
    for _ in range(args.repeats):
        await asyncio.sleep(args.idle_s)
        ms, drafted = await timed(pair.draft())
        draft_idle.append(ms)
        ms, _ = await timed(pair.verify(drafted))  # right after the Draft
        verify_after.append(ms)
        await asyncio.sleep(args.idle_s)
        ms, _ = await timed(pair.verify(variant(drafted)))
        verify_idle.append(ms)
    med = statistics.median
    return {"draft_ms_idle": med(draft_idle), "verify_ms_idle": med(verify_idle),
            "verify_ms_after_draft": med(verify_after),
            "samples": {"draft_ms_idle": draft_idle, "verify_ms_idle": verify_idle,
                        "verify_ms_after_draft": verify_after}}


async def rate(pairs: list[Pair], what: str, seconds: float) -> float:
    """Calls per second in aggregate, every pair calling back to back for `seconds`."""
    drafted = [await p.draft() for p in pairs]
    blocks = [(d, variant(d)) for d in drafted]
    deadline = time.perf_counter() + seconds
    counts = [0] * len(pairs)

    async def loop(i: int) -> None:
        while time.perf_counter() < deadline:
            if what == "draft":
                await pairs[i].draft()
            else:
                await pairs[i].verify(blocks[i][counts[i] % 2])
            counts[i] += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(loop(i) for i in range(len(pairs))))
    return sum(counts) / (time.perf_counter() - t0)


async def measure(slm_address: str, llm_address: str, args) -> dict:
    counts = [int(n) for n in args.sessions.split(",")]
    async with DrafterClient(slm_address, "round-cost") as slm, \
            VerifierClient(llm_address, "round-cost") as llm:
        first = await Pair(slm, llm, args.block, seed=1).open()
        out = await latencies(first, args)
        await first.close()
        out["draft_calls_per_s"], out["verify_calls_per_s"] = {}, {}
        for n in counts:
            pairs = [await Pair(slm, llm, args.block, seed=100 + i).open() for i in range(n)]
            out["draft_calls_per_s"][str(n)] = await rate(pairs, "draft", args.load_s)
            out["verify_calls_per_s"][str(n)] = await rate(pairs, "verify", args.load_s)
            for p in pairs:
                await p.close()
    return out


def run_setting(name: str, zoo, args) -> dict:
    layout, busy = SETTINGS[name]
    procs = []
    try:
        for tier in ("slm", "llm"):
            procs.append(TierProcess.start(tier, engine_flags(tier, zoo, busy), placement=layout))
        for p in procs:
            p.wait_healthy()
        binds = {p.tier: next((line.split("core ids=")[1] for line in p.head
                               if "core ids=" in line), "?") for p in procs}
        result = asyncio.run(measure(procs[0].grpc_address, procs[1].grpc_address, args))
        return {"placement": layout, "busy_loop_ms": busy, "core_ids": binds, **result}
    finally:
        for p in procs:
            p.stop()


def plot(settings: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(settings)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    keys = ["draft_ms_idle", "verify_ms_idle", "verify_ms_after_draft"]
    width = 0.8 / len(keys)
    for j, key in enumerate(keys):
        ax1.bar([i + j * width for i in range(len(names))], [settings[n][key] for n in names],
                width, label=key)
    ax1.set_xticks([i + width for i in range(len(names))], names, rotation=20)
    ax1.set_yscale("log")
    ax1.set_ylabel("ms (median)")
    ax1.set_title("call latency")
    ax1.legend(fontsize=8)
    rates = [(k, n) for k in ("draft_calls_per_s", "verify_calls_per_s")
             for n in settings[names[0]][k]]
    width = 0.8 / len(rates)
    for j, (key, n) in enumerate(rates):
        ax2.bar([i + j * width for i in range(len(names))], [settings[s][key][n] for s in names],
                width, label=f"{key.split('_')[0]}, {n} session(s)")
    ax2.set_xticks([i + 0.4 for i in range(len(names))], names, rotation=20)
    ax2.set_ylabel("calls/s (aggregate)")
    ax2.set_title("throughput")
    ax2.legend(fontsize=8)
    fig.suptitle("round cost on co-located tiers (SLM + LLM, network off)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    args = parse_args(argv)
    exit_on_sigterm()
    from hilm_vllm.zoo import ensure_zoo

    zoo = ensure_zoo(args.zoo)
    settings = {}
    for name in args.settings.split(","):
        t0 = time.perf_counter()
        settings[name] = run_setting(name, zoo, args)
        s = settings[name]
        print(f"{name:14s} draft idle {s['draft_ms_idle']:7.1f} ms  verify idle "
              f"{s['verify_ms_idle']:7.1f} ms  after draft {s['verify_ms_after_draft']:7.1f} ms  "
              f"draft/s {s['draft_calls_per_s']}  verify/s {s['verify_calls_per_s']}  "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    top_name = "default" if "default" in settings else next(iter(settings))
    top = {k: settings[top_name][k] for k in ("draft_ms_idle", "verify_ms_idle",
                                              "verify_ms_after_draft", "draft_calls_per_s",
                                              "verify_calls_per_s")}
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()} | {
        "top_level_setting": top_name, "settings_known": {k: list(v) for k, v in SETTINGS.items()}}
    path = write_result("round_cost", config, top | {"settings": settings}, out_dir=args.out)
    plot(settings, path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
