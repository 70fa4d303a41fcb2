"""Cost of one verification round, per draft block size and context length.

    .venv/bin/python bench/verify_cost.py [--zoo demo] [--rounds 12] [--no-grpc]

Phase 1, in process: one AsyncLLM on the zoo's LLM with the verifier's worker hook. Each cell
(context c, block k) runs a growing session: the context starts at c held-out tokens; each round
the zoo's SLM (transformers, same temperature / top-k) samples k draft tokens with their sparse
q, and these routes score the SAME tokens, in an order rotated every round, each in its own
cache_salt namespace so that each sees the same prefix-cache state:
  verify          - `Verifier.verify`: the tier's domain call (validation, one engine request
                    with the worker hook, the result pushed back), what the gRPC servicer runs;
  hooked          - the verify round's engine request alone (hook on, result awaited): no
                    session, no validation, so verify - hooked is the API side's cost;
  plain           - a plain prefix-cached forward of the same tokens (max_tokens=1, no hook);
  prompt_logprobs - the public route: prompt_logprobs=-1 on the same tokens, then the same
                    accept / recover math on the client (`rejection.verify_block`);
  rpc             - one empty collective_rpc: what fetching m by RPC would add to a round.
The verify route's outcome advances the session; the others follow its token history. The
bench process runs torch on one thread and freezes its GC heap after startup (as vLLM's servers
do), so that the harness's own drafter does not take the engine's cores or pause a round.
Phase 2 (unless --no-grpc): `hilm-serve --tier llm` as a subprocess, the same cells through the
gRPC client (what the router sees), with the server's queue / forward split.

Targets (from the issue): verify <= 1.2x plain; verify at 1024 <= 1.3x at 128 (per block);
prompt_logprobs >= 15x verify. Writes bench/results/verify_cost-<UTC>.json.
"""

from __future__ import annotations

import argparse
import sys
import asyncio
import collections
import gc
import itertools
import statistics
import time
import uuid

from hilm_vllm.lab.bench import add_common_args
from hilm_vllm.launch import TierProcess
from hilm_vllm.lab.benchjson import write_result
from hilm_vllm.zoo import find_zoo

CONTEXTS = (128, 256, 512, 1024)
BLOCKS = (1, 2, 4, 8)
WARMUP_ROUNDS = 2  # the first round prefills the whole context; not a steady-state round
TEMPERATURE, TOP_K = 1.0, 50  # every route and the drafter sample with these (q is top-50 sparse)
MAX_MODEL_LEN = 2048  # room for the longest context plus its rounds
ENGINE = dict(dtype="float32", block_size=32, kv_cache_memory_bytes=256 << 20,
              enforce_eager=True, max_model_len=MAX_MODEL_LEN, enable_prefix_caching=True,
              seed=0)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(p, "model family whose LLM verifies")
    p.add_argument("--rounds", type=int, default=12, help="measured rounds per cell")
    p.add_argument("--no-grpc", action="store_true", help="skip phase 2 (served tier)")
    p.add_argument("--contexts", type=_ints, default=CONTEXTS, help="default: 128,256,512,1024")
    p.add_argument("--blocks", type=_ints, default=BLOCKS, help="default: 1,2,4,8")
    return p.parse_args(argv)


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(","))


def held_out_tokens(zoo, n: int) -> list[int]:
    """n tokens of held-out text (BOS first), the rows of heldout.jsonl concatenated."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(zoo.llm))
    ids = [tokenizer.bos_token_id]
    for row in itertools.cycle(zoo.heldout_prompts()):
        ids += tokenizer.encode(row["prompt"] + row["reference"], add_special_tokens=False)
        if len(ids) >= n:
            return ids[:n]


class Drafter:
    """The zoo's SLM in transformers, sampling k tokens and their exact sparse q (not timed)."""

    def __init__(self, zoo):
        import torch
        from transformers import AutoModelForCausalLM

        from hilm_vllm.sampling import SamplingSpec  # loads torch / vLLM: only when it runs

        # One thread: the bench process must not take the engine worker's cores.
        torch.set_num_threads(1)
        self.model = AutoModelForCausalLM.from_pretrained(str(zoo.slm), dtype=torch.float32)
        self.spec = SamplingSpec(TEMPERATURE, TOP_K)
        self.generator = torch.Generator().manual_seed(0)

    def draft(self, history: list[int], k: int) -> tuple[list[int], list[tuple]]:
        import torch

        # loads torch / vLLM: only when it runs
        from hilm_vllm.sampling import processed_probs, to_sparse

        tokens, dists, past, feed = [], [], None, history
        with torch.inference_mode():
            for _ in range(k):
                out = self.model(torch.tensor([feed]), past_key_values=past, use_cache=True)
                q = processed_probs(out.logits[0, -1:], self.spec)[0]  # [V]
                x = int(torch.multinomial(q, 1, generator=self.generator))
                tokens.append(x)
                dists.append(to_sparse(q))
                past, feed = out.past_key_values, [x]
        return tokens, dists


def stats(ms: list[float]) -> dict:
    ms = sorted(ms)
    return {"median": statistics.median(ms), "p90": ms[int(0.9 * (len(ms) - 1))],
            "mean": statistics.fmean(ms), "n": len(ms)}


# ---- phase 1: three routes on one in-process engine ------------------------------------------

async def start_engine(zoo):
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    from hilm_vllm.verifier.tier import WORKER_EXTENSION  # loads torch / vLLM: only when it runs

    args = AsyncEngineArgs(model=str(zoo.llm), worker_extension_cls=WORKER_EXTENSION,
                           max_logprobs=-1, **ENGINE)  # -1: the prompt_logprobs route's full rows
    return AsyncLLM.from_engine_args(args)


async def final_output(engine, ids, salt, params):
    from vllm.inputs.engine import tokens_input

    out = None
    async for out in engine.generate(tokens_input(ids, cache_salt=salt), params,
                                     request_id=uuid.uuid4().hex):
        pass
    return out


def spec(seed=None):
    from hilm_vllm.sampling import SamplingSpec  # loads torch / vLLM: only when it runs

    return SamplingSpec(TEMPERATURE, TOP_K, seed=seed)


async def plain_round(engine, ids, salt) -> float:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    params = SamplingParams(**spec().vllm_kwargs(), max_tokens=1, detokenize=False,
                            output_kind=RequestOutputKind.FINAL_ONLY)
    t0 = time.perf_counter()
    await final_output(engine, ids, salt, params)
    return (time.perf_counter() - t0) * 1e3


async def logprobs_round(engine, ids, salt, dists) -> float:
    """prompt_logprobs=-1 on context + draft, then the accept / recover step on the client."""
    import torch
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    # loads torch / vLLM: only when it runs
    from hilm_vllm.rejection import SparseRows, verify_block
    from hilm_vllm.sampling import processed_probs  # loads torch / vLLM: only when it runs

    params = SamplingParams(**spec().vllm_kwargs(), max_tokens=1, detokenize=False,
                            prompt_logprobs=-1, flat_logprobs=True,
                            skip_reading_prefix_cache=False,  # else it recomputes everything
                            output_kind=RequestOutputKind.FINAL_ONLY)
    t0 = time.perf_counter()
    out = await final_output(engine, ids, salt, params)
    k, flat, vocab = len(dists), out.prompt_logprobs, engine.model_config.get_vocab_size()
    rows = torch.full((k, vocab), -torch.inf)  # [k, V] raw log p at the draft positions
    for j, pos in enumerate(range(len(ids) - k, len(ids))):  # cached rows before are garbage
        lo, hi = flat.start_indices[pos], flat.end_indices[pos]
        rows[j, torch.tensor(flat.token_ids[lo:hi])] = torch.tensor(flat.logprobs[lo:hi])
    verify_block(processed_probs(rows, spec()), torch.tensor(ids[len(ids) - k:]),
                 SparseRows.from_lists(dists), torch.Generator().manual_seed(0))
    return (time.perf_counter() - t0) * 1e3


async def hooked_round(verifier, ids, salt, dists) -> float:
    """A verify round's engine request alone (hook on, pushed result awaited): no session,
    no validation. verify - hooked = the API side; hooked - plain = the hook in the worker."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    from hilm_vllm.verifier.wire import VerifyArgs  # loads torch / vLLM: only when it runs

    args = VerifyArgs.build(uuid.uuid4().hex, spec(), 0, dists)
    params = SamplingParams(**spec(seed=0).vllm_kwargs(), max_tokens=1, detokenize=False,
                            output_kind=RequestOutputKind.FINAL_ONLY,
                            extra_args=args.to_extra_args())
    t0 = time.perf_counter()
    pushed = verifier.channel.expect(args.key)
    await final_output(verifier.engine, ids, salt, params)
    await pushed
    verifier.channel.forget(args.key)
    return (time.perf_counter() - t0) * 1e3


async def rpc_round(engine) -> float:
    """One collective_rpc that finds nothing: the price of fetching a result from the worker."""
    t0 = time.perf_counter()
    await engine.collective_rpc("hilm_pop_verify", args=("absent",))
    return (time.perf_counter() - t0) * 1e3


class Cell:
    """One (context, block) session: the history, and the timings of each route per round."""

    def __init__(self, stream, c, k):
        self.history, self.k = list(stream[:c]), k
        self.times = collections.defaultdict(list)  # route -> ms per measured round
        self.replies, self.contexts = [], []

    def record(self, measured: bool, draft, reply, times: dict) -> None:
        if measured:
            for name, ms in times.items():
                self.times[name].append(ms)
            self.replies.append(reply)
            self.contexts.append(len(self.history))
        self.history += [*draft[:reply.num_accepted], reply.next_token]

    def summary(self, hook_ms: float | None = None) -> dict:
        out = {f"{name}_ms": stats(ms) for name, ms in self.times.items() if ms}
        t = [r.timings for r in self.replies]
        out |= {"server_forward_ms": stats([x.forward_ms for x in t]),
                "server_queue_ms": stats([x.queue_ms for x in t]),
                "accept_rate": sum(r.num_accepted for r in self.replies) / (len(t) * self.k),
                "context_range": [self.contexts[0], self.contexts[-1]]}
        return out | ({"hook_ms_mean": hook_ms} if hook_ms is not None else {})


async def cell_in_process(engine, verifier, drafter, stream, c, k, rounds) -> dict:
    from hilm_vllm.verifier.session import VerifyCall  # loads torch / vLLM: only when it runs

    opened = await verifier.open_session("bench", stream[:c], spec(seed=c))
    cell = Cell(stream, c, k)
    hook_before = None
    salts = {name: f"{name}-{c}-{k}-{uuid.uuid4().hex[:6]}"
             for name in ("plain", "hooked", "logprobs")}
    for r in range(WARMUP_ROUNDS + rounds):
        draft, dists = drafter.draft(cell.history, k)
        ids = cell.history + draft
        call = VerifyCall(len(cell.history), (), tuple(draft),
                          tuple((tuple(i), tuple(p)) for i, p in dists))
        times, replies = {}, []

        async def verify_route():
            t0 = time.perf_counter()
            replies.append(await verifier.verify("bench", opened.session_id, call))
            return (time.perf_counter() - t0) * 1e3

        routes = [("verify", verify_route),
                  ("plain", lambda: plain_round(engine, ids, salts["plain"])),
                  ("hooked", lambda: hooked_round(verifier, ids, salts["hooked"], dists)),
                  ("prompt_logprobs", lambda: logprobs_round(engine, ids, salts["logprobs"],
                                                             dists)),
                  ("rpc", lambda: rpc_round(engine))]
        if r == WARMUP_ROUNDS:
            hook_before = (await engine.collective_rpc("hilm_verify_stats"))[0]
        turn = r % len(routes)
        for name, run in routes[turn:] + routes[:turn]:  # rotate the order every round
            times[name] = await run()
        cell.record(r >= WARMUP_ROUNDS, draft, replies[0], times)
    hook_after = (await engine.collective_rpc("hilm_verify_stats"))[0]
    await verifier.close_session("bench", opened.session_id)
    return cell.summary((hook_after["hook_ms"] - hook_before["hook_ms"])
                        / (hook_after["verified"] - hook_before["verified"]))


async def phase_in_process(zoo, drafter, stream, grid, rounds) -> dict:
    # loads torch / vLLM: only when it runs
    from hilm_vllm.verifier.core import Verifier, VerifierSettings

    engine = await start_engine(zoo)
    try:
        verifier = await Verifier.start(engine, VerifierSettings())  # as the tier does
        gc.collect()
        gc.freeze()  # as vLLM's own servers do after startup: no full collections mid-round
        cells = {}
        for c, k in grid:
            cell = cells[f"c{c}-k{k}"] = await cell_in_process(engine, verifier, drafter,
                                                                stream, c, k, rounds)
            print(f"  c={c:5d} k={k}: " + "  ".join(
                f"{n} {cell[n + '_ms']['median']:.1f}"
                for n in ("verify", "hooked", "plain", "prompt_logprobs", "rpc")), flush=True)
        return cells
    finally:
        engine.shutdown()


# ---- phase 2: the served tier over gRPC -------------------------------------------------------

async def cell_grpc(client, drafter, stream, c, k, rounds) -> dict:
    s = await client.open_session(stream[:c], spec(seed=c))
    cell = Cell(stream, c, k)
    for r in range(WARMUP_ROUNDS + rounds):
        draft, dists = drafter.draft(cell.history, k)
        t0 = time.perf_counter()
        reply = await client.verify(s.session_id, len(cell.history), draft, dists)
        cell.record(r >= WARMUP_ROUNDS, draft, reply, {"grpc": (time.perf_counter() - t0) * 1e3})
    await client.close_session(s.session_id)
    summary = cell.summary()
    return {"grpc_ms": summary["grpc_ms"], "grpc_server_forward_ms": summary["server_forward_ms"],
            "grpc_server_queue_ms": summary["server_queue_ms"]}


def phase_grpc(zoo, drafter, stream, grid, rounds) -> dict:
    from hilm_vllm.verifier.client import VerifierClient  # loads torch / vLLM: only when it runs

    flags = ["--model", str(zoo.llm), "--port", "0", "--metrics-port", "0", "--dtype", "float32",
             "--block-size", "32", "--kv-cache-memory-bytes", "256M", "--enforce-eager",
             "--max-model-len", str(MAX_MODEL_LEN), "--seed", "0"]

    async def run(address):
        async with VerifierClient(address, "bench") as client:
            return {f"c{c}-k{k}": await cell_grpc(client, drafter, stream, c, k, rounds)
                    for c, k in grid}

    with TierProcess.start("llm", flags) as proc:
        proc.wait_healthy()
        return asyncio.run(run(proc.grpc_address))


# ---- report -------------------------------------------------------------------------------------

def targets(cells: dict, contexts, blocks) -> dict:
    def med(c, k, route):
        return cells[f"c{c}-k{k}"][f"{route}_ms"]["median"]

    pairs = list(itertools.product(contexts, blocks))
    over_plain = {f"c{c}-k{k}": med(c, k, "verify") / med(c, k, "plain") for c, k in pairs}
    speedup = {f"c{c}-k{k}": med(c, k, "prompt_logprobs") / med(c, k, "verify") for c, k in pairs}
    growth = {f"k{k}": med(contexts[-1], k, "verify") / med(contexts[0], k, "verify")
              for k in blocks}
    plain_growth = {f"k{k}": med(contexts[-1], k, "plain") / med(contexts[0], k, "plain")
                    for k in blocks}  # the forward's own growth, for reference
    return {
        "verify_over_plain": {
            "target_max": 1.2, "values": over_plain,
            "met": all(v <= 1.2 for v in over_plain.values())},
        f"verify_{contexts[-1]}_over_{contexts[0]}": {
            "target_max": 1.3, "values": growth, "plain_for_reference": plain_growth,
            "met": all(v <= 1.3 for v in growth.values())},
        "prompt_logprobs_over_verify": {
            "target_min": 15.0, "values": speedup,
            "met": all(v >= 15 for v in speedup.values())},
    }


def table(cells: dict, tg: dict, grid) -> str:
    """Medians in ms; hook = the worker hook's own mean time, rpc = one result fetch."""
    lines = ["| context | block | verify | hooked | plain | verify/plain | hook | rpc | "
             "prompt_logprobs | logprobs/verify | gRPC round | accept |", "|" + " --- |" * 12]
    for c, k in grid:
        key = f"c{c}-k{k}"
        cell, med = cells[key], (lambda name: cells[key][f"{name}_ms"]["median"])
        grpc = f"{med('grpc'):.1f}" if "grpc_ms" in cell else "-"
        lines.append(
            f"| {c} | {k} | {med('verify'):.1f} | {med('hooked'):.1f} | {med('plain'):.1f} "
            f"| {tg['verify_over_plain']['values'][key]:.2f} | {cell['hook_ms_mean']:.2f} "
            f"| {med('rpc'):.2f} | {med('prompt_logprobs'):.1f} "
            f"| {tg['prompt_logprobs_over_verify']['values'][key]:.0f}x | {grpc} "
            f"| {cell['accept_rate']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:

    args = parse_args(argv)
    zoo = find_zoo(args.zoo)
    if zoo is None:
        raise SystemExit(f"the {args.zoo!r} zoo is not built: run `hilm zoo build --recipe "
                         f"{args.zoo}` first")
    grid = list(itertools.product(args.contexts, args.blocks))
    stream = held_out_tokens(zoo, max(args.contexts))  # the contexts; drafts come from the SLM
    drafter = Drafter(zoo)
    print("phase 1: in-process routes", flush=True)
    cells = asyncio.run(phase_in_process(zoo, drafter, stream, grid, args.rounds))
    if not args.no_grpc:
        print("phase 2: served tier over gRPC", flush=True)
        for key, cell in phase_grpc(zoo, drafter, stream, grid, args.rounds).items():
            cells[key] |= cell
    tg = targets(cells, args.contexts, args.blocks)
    config = {"zoo": args.zoo, "model": str(zoo.llm), "contexts": args.contexts,
              "blocks": args.blocks, "rounds": args.rounds, "warmup_rounds": WARMUP_ROUNDS,
              "temperature": TEMPERATURE, "top_k": TOP_K, "engine": ENGINE,
              "draft": "the zoo's SLM (transformers) sampling k tokens; q its top-k distribution"}
    path = write_result("verify_cost", config,
                        {"cells": cells, "targets": tg, "table": table(cells, tg, grid)},
                        out_dir=args.out)
    print(table(cells, tg, grid))
    print({name: t["met"] for name, t in tg.items()})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
