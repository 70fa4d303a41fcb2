"""What one round costs on co-located tiers: a drafter and a verifier on the same machine.

    .venv/bin/python bench/round_cost.py                      # demo zoo, every part below
    .venv/bin/python bench/round_cost.py --zoo tiny --repeats 5 --load-s 5 --contexts 16,900
    hilm bench round-cost --only vocab                        # one part: settings/context/vocab

Three parts (`--only` runs one). Each launches an SLM and an LLM tier (`hilm-serve` with the
family's `engine_configs/<family>-<tier>.yaml`, the demo's where a family has none, and no
flags of this benchmark's own: the drafter's defaults, no --draft-top-k) and measures through
their gRPC services, network model off, sampling at T = 1 without top-k.

settings: for each setting (engine placement x shm busy-loop window), the --zoo family:

  draft_ms_idle          a Draft of --block tokens after --idle-s of silence (median)
  verify_ms_idle         a Verify of --block drafted tokens after --idle-s of silence
  verify_ms_after_draft  the same Verify issued the moment its Draft returns (what a round does)
  draft_calls_per_s      {"1": ..., "8": ...}: Drafts per second in aggregate, N sessions each
                         drafting back to back for --load-s (each Draft cuts its session back, so
                         every call drafts the same length from the same context length)
  verify_calls_per_s     the same for Verify calls of --block tokens

context: the --zoo family on the default setting, one idle session per context length N of
--contexts (a prompt of exactly N token ids: the family's held-out text, tokenized and repeated
to length; N + block + 1 must fit the engine configs' max-model-len):

  draft_ms_by_context    {"16": ..., "1900": ...}: draft_ms_idle of a session whose prompt has
                         N tokens (same idle gap, same repeats)
  verify_ms_by_context   the same for verify_ms_idle
  draft_context_ratio    draft_ms_by_context at the longest context / at the shortest (issue 21:
  verify_context_ratio   verify_context_ratio <= 1.2 for 1900 against 16); null with one context
  context_family         the family measured (--zoo)
  context_detail         per N: the three latencies, their samples, context_tokens, and the wire
                         sizes below

vocab: each family of --vocab-families in turn on the default setting, a 16-token prompt, keyed
by the family's vocabulary size (its LLM's config.json `vocab_size`: demo -> "272"):

  draft_ms_by_vocab      {"272": ..., "32000": ..., "128256": ...}: draft_ms_idle
  verify_ms_by_vocab     verify_ms_idle
  draft_vocab_ratio      each vocabulary's figure / the base vocabulary's (`vocab_ratio_base`:
  verify_vocab_ratio     "272" when measured, else the smallest measured)
  draft_reply_bytes_by_vocab      serialized size (protobuf ByteSize, as the router's links
  verify_request_bytes_by_vocab   count it) of a Draft reply / a Verify request of --block
                                  tokens, median over the part's calls (absent when the clients'
                                  stubs cannot be wrapped)
  vocab_families         {"272": "demo", ...}: which family gave each key
  vocab_detail           per family: what context_detail holds, for its 16-token prompt
  skipped_families       {family: why}: a family that is not a zoo recipe, would not build or
                         start, or repeats a vocabulary size; the others are still measured

Settings: `default` is what hilm-serve does today (placement `spread`, window 0 on CPU);
`vllm-spin` is vLLM's own behaviour (every worker bound to the first core, 1 s busy loop) —
the "before" of the round-cost issue; the others vary one of the two. Timings are ratios within
one run: the machine is shared and noisy.

Writes bench/results/round_cost-<UTC>.json: config, git_commit, machine, and under `results`
the keys of the parts that ran: the default setting's figures (the settings keys above) and every
setting's under `results.settings`; the context and vocab keys. A PNG of the latencies and call
rates per setting beside it, and `round_cost-<UTC>-scaling.png`: latency against context length
and against vocabulary size.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path


from hilm_vllm.lab.benchjson import write_result
from hilm_vllm.drafter.client import DrafterClient
from hilm_vllm.launch import TierProcess, exit_on_sigterm
from hilm_vllm.sampling import SamplingSpec
from hilm_vllm.verifier.client import VerifierClient
from hilm_vllm.lab.bench import add_common_args
from hilm_vllm.stack import config_path, find_config
from hilm_vllm.zoo import ensure_zoo, recipe_names

# name -> (placement layout, --engine-busy-loop-ms or None for hilm-serve's default)
SETTINGS = {
    "default": ("spread", None),
    "vllm-spin": ("vllm", 1000.0),
    "spread-spin": ("spread", 1000.0),
    "vllm-nospin": ("vllm", 0.0),
    "nobind-nospin": ("nobind", 0.0),
}
PROMPT = "import os\nimport sys\n\n\ndef main(argv):\n    parser = "
PARTS = ("settings", "context", "vocab")
VOCAB_CONTEXT = 16  # prompt tokens of the vocab part's sessions
VOCAB_BASE = "272"  # the demo family's vocabulary: what the vocab ratios divide by when measured
TIERS = ("slm", "llm")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, "model family of the SLM and LLM (settings and context parts)")
    p.add_argument("--only", choices=("all", *PARTS), default="all",
                   help="run one part (default: all)")
    p.add_argument("--settings", default=",".join(SETTINGS),
                   help=f"comma-separated, of: {', '.join(SETTINGS)} (default: all)")
    p.add_argument("--contexts", default="16,1900",
                   help="prompt lengths in tokens of the context part (default: 16,1900)")
    p.add_argument("--vocab-families", default="demo,vocab32k,vocab128k",
                   help="zoo families of the vocab part (default: demo,vocab32k,vocab128k)")
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
    try:
        args.context_list = parse_counts(args.contexts, "--contexts")
    except ValueError as e:
        p.error(str(e))
    args.family_list = [f.strip() for f in args.vocab_families.split(",") if f.strip()]
    if not args.family_list:
        p.error("--vocab-families names no family")
    if args.block < 1 or args.repeats < 1:
        p.error("--block and --repeats must be >= 1")
    return args


def parse_counts(text: str, flag: str) -> list[int]:
    """Comma-separated positive integers, in order, without repeats."""
    out: list[int] = []
    for part in text.split(","):
        try:
            n = int(part)
        except ValueError:
            raise ValueError(f"{flag}: {part.strip()!r} is not an integer") from None
        if n < 1:
            raise ValueError(f"{flag}: {n} is not a positive token count")
        if n not in out:
            out.append(n)
    return out


def parts_to_run(only: str) -> list[str]:
    return list(PARTS) if only == "all" else [only]


# ---- engine flags and configs --------------------------------------------------------------

def engine_config(family: str, tier: str) -> Path:
    """The family's `engine_configs/<family>-<tier>.yaml` (`find_config`), else the demo's."""

    return find_config(f"{family}-{tier}.yaml") or config_path(f"engine_configs/demo-{tier}.yaml")


def engine_flags(tier: str, zoo, busy_loop_ms: float | None, family: str = "demo") -> list[str]:
    flags = ["--model", str(zoo.model(tier)), "--config", str(engine_config(family, tier)),
             "--port", "0", "--metrics-port", "0"]
    if busy_loop_ms is not None:
        flags += ["--engine-busy-loop-ms", f"{busy_loop_ms:g}"]
    return flags


def config_max_model_len(path: Path) -> int | None:
    """The `max-model-len` an engine config sets, None when it sets none (or is missing)."""
    import yaml

    if not Path(path).is_file():
        return None
    value = (yaml.safe_load(Path(path).read_text()) or {}).get("max-model-len")
    return None if value is None else int(value)


def context_error(contexts: Sequence[int], block: int, max_model_len: int | None,
                  where: str) -> str | None:
    """Why the longest context cannot be measured (a session holds N + block + 1 tokens after
    a Verify), None when every one fits or the limit is unknown."""
    if max_model_len is None or not contexts:
        return None
    longest = max(contexts)
    if longest + block + 1 > max_model_len:
        return (f"context {longest} + block {block} + 1 exceeds max-model-len {max_model_len} "
                f"({where}): pass --contexts up to {max_model_len - block - 1}")
    return None


def vocab_size(model_dir: Path) -> int:
    """The model's vocabulary size, its config.json `vocab_size`."""
    config = Path(model_dir) / "config.json"
    size = json.loads(config.read_text()).get("vocab_size")
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"{config} has no vocab_size")
    return size


# ---- prompts --------------------------------------------------------------------------------

def context_ids(head: Sequence[int], body: Sequence[int], n: int) -> list[int]:
    """Exactly `n` token ids: `head` (the tokenizer's BOS, if any), then `body` repeated."""
    if n < 1:
        raise ValueError(f"a context needs at least one token, got {n}")
    head = list(head)[:n]
    if len(head) < n and not body:
        raise ValueError("no tokens to fill the context with")
    out = list(head)
    while len(out) < n:
        out.extend(body[:n - len(out)])
    return out


def family_text(zoo) -> str:
    """The text contexts are cut from: PROMPT, then the family's held-out prompts and references."""
    rows = zoo.heldout_prompts()
    return PROMPT + "".join(r["prompt"] + r["reference"] + "\n" for r in rows)


def family_tokens(zoo) -> tuple[list[int], list[int]]:
    """(head, body): what the family's tokenizer puts before any text (its BOS), and the ids of
    family_text without it."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(zoo.model("slm") / "tokenizer.json"))
    text = family_text(zoo)
    full = tok.encode(text).ids
    body = tok.encode(text, add_special_tokens=False).ids
    return full[:len(full) - len(body)], body


# ---- arithmetic of the results --------------------------------------------------------------

def keyed(figures: dict[int, float | None]) -> dict[str, float | None]:
    """A figure per token count or vocabulary size, keyed by the number as a string, ascending."""
    return {str(k): figures[k] for k in sorted(figures)}


def context_ratio(by_context: dict[str, float]) -> float | None:
    """The longest context's figure / the shortest's; None with fewer than two contexts."""
    if len(by_context) < 2:
        return None
    keys = sorted(by_context, key=int)
    return by_context[keys[-1]] / by_context[keys[0]]


def vocab_base(by_vocab: dict[str, float]) -> str | None:
    """The key the vocab ratios divide by: "272" when measured, else the smallest vocabulary."""
    if not by_vocab:
        return None
    return VOCAB_BASE if VOCAB_BASE in by_vocab else min(by_vocab, key=int)


def ratios(by_key: dict[str, float], base: str | None) -> dict[str, float]:
    """Each figure / the figure at `base` ({} without a base)."""
    if base is None:
        return {}
    return {k: v / by_key[base] for k, v in by_key.items()}


def family_skip_reason(family: str, known: Sequence[str]) -> str | None:
    """Why `family` cannot be measured before trying it (None: try it)."""
    if family not in known:
        return f"not a zoo family (known: {', '.join(sorted(known))})"
    return None


def assign_vocab_keys(sizes: dict[str, int]) -> tuple[dict[str, str], dict[str, str]]:
    """(vocabulary key -> family, family -> why skipped): families in order, a family whose
    vocabulary size an earlier one already has is skipped."""
    keys: dict[str, str] = {}
    skipped: dict[str, str] = {}
    for family, size in sizes.items():
        key = str(size)
        if key in keys:
            skipped[family] = f"vocabulary {size} already measured on {keys[key]}"
        else:
            keys[key] = family
    return keys, skipped


def median_or_none(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


# ---- sessions and calls ---------------------------------------------------------------------

class Pair:
    """A drafter session and a verifier session on the same prompt, cut back every call."""

    def __init__(self, slm: DrafterClient, llm: VerifierClient, block: int, seed: int | None,
                 prompt: str | Sequence[int] = PROMPT):
        """`seed`: the verifier session's (its acceptance draws; None: fresh draws every call);
        `prompt`: text or token ids."""
        self.slm, self.llm, self.block, self.seed = slm, llm, block, seed
        self.prompt = prompt if isinstance(prompt, str) else list(prompt)

    async def open(self) -> Pair:
        # Unseeded: every Draft samples afresh. A verifier replays a call identical to its last
        # one (a client's retry) without the engine, so Verify calls alternate between two
        # blocks (`variant`) and never repeat the previous call.
        self.d = await self.slm.open_session(self.prompt, SamplingSpec(temperature=1.0))
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
    """The drafted block with one token swapped for another one of its support, the last token
    that has another (the same size of work for the verifier, a different call); unchanged
    when every token's support is that token alone."""
    block = [(t.token_id, (t.ids, t.probs)) for t in drafted.tokens]
    for i in reversed(range(len(block))):
        token, (ids, probs) = block[i]
        other = next((int(x) for x in ids if int(x) != token), None)
        if other is not None:
            return block[:i] + [(other, (ids, probs))] + block[i + 1:]
    return block


class _Recorded:
    """A stub method that keeps every request or reply it passes (sized after the timing)."""

    def __init__(self, method, kept: list, which: str):
        self.method, self.kept, self.which = method, kept, which

    async def __call__(self, request, **kw):
        reply = await self.method(request, **kw)
        self.kept.append(request if self.which == "request" else reply)
        return reply


class WireSizes:
    """The serialized sizes of the Draft replies and Verify requests two clients exchange. The
    typed clients do not hand out their messages, so this wraps their stubs' Draft and Verify;
    `available` is False (and the sizes None) where a stub is not where it is looked for."""

    def __init__(self, slm: DrafterClient, llm: VerifierClient):
        self.draft_replies: list = []
        self.verify_requests: list = []
        stubs = (getattr(slm, "_stub", None), getattr(llm, "_verifier", None))
        self.available = (hasattr(stubs[0], "Draft") and hasattr(stubs[1], "Verify"))
        if self.available:
            stubs[0].Draft = _Recorded(stubs[0].Draft, self.draft_replies, "reply")
            stubs[1].Verify = _Recorded(stubs[1].Verify, self.verify_requests, "request")

    def clear(self) -> None:
        self.draft_replies.clear()
        self.verify_requests.clear()

    def medians(self) -> dict[str, float | None]:
        if not self.available:
            return {"draft_reply_bytes": None, "verify_request_bytes": None}
        return {"draft_reply_bytes": median_or_none([m.ByteSize() for m in self.draft_replies]),
                "verify_request_bytes": median_or_none(
                    [m.ByteSize() for m in self.verify_requests])}


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


async def measure_contexts(slm_address: str, llm_address: str, prompts: dict[int, list[int]],
                           args) -> dict[str, dict]:
    """Idle latencies (`latencies`) of one session per prompt, one session at a time, with the
    wire sizes of its calls; keyed by the prompt's length."""
    out = {}
    async with DrafterClient(slm_address, "round-cost") as slm, \
            VerifierClient(llm_address, "round-cost") as llm:
        sizes = WireSizes(slm, llm)
        for n, ids in prompts.items():
            pair = await Pair(slm, llm, args.block, seed=1, prompt=ids).open()
            sizes.clear()
            result = await latencies(pair, args)
            await pair.close()
            out[str(n)] = {**result, "context_tokens": len(pair.d.prompt_token_ids),
                           **sizes.medians()}
    return out


# ---- launching ------------------------------------------------------------------------------

@contextmanager
def launched(family: str, zoo, layout: str, busy: float | None):
    """The family's SLM and LLM tiers, started, healthy, and stopped on the way out."""
    procs = []
    try:
        for tier in TIERS:
            procs.append(TierProcess.start(tier, engine_flags(tier, zoo, busy, family),
                                           placement=layout))
        for p in procs:
            p.wait_healthy()
        yield procs
    finally:
        for p in procs:
            p.stop()


def core_ids(procs: list[TierProcess]) -> dict[str, str]:
    return {p.tier: next((line.split("core ids=")[1] for line in p.head
                          if "core ids=" in line), "?") for p in procs}


def run_setting(name: str, zoo, args) -> dict:
    layout, busy = SETTINGS[name]
    with launched(args.zoo, zoo, layout, busy) as procs:
        result = asyncio.run(measure(procs[0].grpc_address, procs[1].grpc_address, args))
        return {"placement": layout, "busy_loop_ms": busy, "core_ids": core_ids(procs),
                **result}


def run_family(family: str, zoo, contexts: Sequence[int], args) -> dict:
    """One idle session per context length on the family's tiers, default setting."""
    head, body = family_tokens(zoo)
    prompts = {n: context_ids(head, body, n) for n in contexts}
    layout, busy = SETTINGS["default"]
    with launched(family, zoo, layout, busy) as procs:
        by_context = asyncio.run(measure_contexts(procs[0].grpc_address, procs[1].grpc_address,
                                                  prompts, args))
        return {"family": family, "vocab_size": vocab_size(zoo.model("llm")),
                "engine_configs": {t: engine_config(family, t).name for t in TIERS},
                "core_ids": core_ids(procs), "contexts": by_context}


def check_contexts(family: str, contexts: Sequence[int], block: int) -> None:
    """Fail now, saying what fits, when a context is too long for the family's engine configs."""
    for tier in TIERS:
        config = engine_config(family, tier)
        if error := context_error(contexts, block, config_max_model_len(config), config.name):
            raise SystemExit(f"error: {error}")


# ---- the parts ------------------------------------------------------------------------------

def context_results(run: dict, contexts: Sequence[int]) -> dict:
    detail = {str(n): run["contexts"][str(n)] for n in contexts}
    draft = {k: v["draft_ms_idle"] for k, v in detail.items()}
    verify = {k: v["verify_ms_idle"] for k, v in detail.items()}
    return {"draft_ms_by_context": draft, "verify_ms_by_context": verify,
            "draft_context_ratio": context_ratio(draft),
            "verify_context_ratio": context_ratio(verify),
            "context_family": run["family"], "context_detail": detail}


def vocab_results(runs: dict[str, dict], skipped: dict[str, str]) -> dict:
    """The vocab part's keys from each measured family's run (family -> run_family's result)."""
    keys, repeated = assign_vocab_keys({f: r["vocab_size"] for f, r in runs.items()})
    detail = {family: runs[family] for family in keys.values()}
    at = {key: runs[family]["contexts"][str(VOCAB_CONTEXT)] for key, family in keys.items()}
    order = sorted(at, key=int)
    draft = {k: at[k]["draft_ms_idle"] for k in order}
    verify = {k: at[k]["verify_ms_idle"] for k in order}
    base = vocab_base(draft)
    out = {"draft_ms_by_vocab": draft, "verify_ms_by_vocab": verify,
           "draft_vocab_ratio": ratios(draft, base), "verify_vocab_ratio": ratios(verify, base),
           "vocab_ratio_base": base}
    if any(at[k]["draft_reply_bytes"] is not None for k in order):
        out["draft_reply_bytes_by_vocab"] = {k: at[k]["draft_reply_bytes"] for k in order}
        out["verify_request_bytes_by_vocab"] = {k: at[k]["verify_request_bytes"] for k in order}
    return out | {"vocab_families": {k: keys[k] for k in order}, "vocab_detail": detail,
                  "skipped_families": {**skipped, **repeated}}


def run_vocab(args, reuse: dict[str, dict]) -> dict:
    """Every family of --vocab-families in turn (`reuse`: runs already made, by family); a
    family that cannot be measured is skipped, saying why."""

    runs: dict[str, dict] = {}
    skipped: dict[str, str] = {}
    seen: dict[int, str] = {}
    for family in args.family_list:
        if family in runs or family in skipped:
            continue
        t0 = time.perf_counter()
        reason = family_skip_reason(family, recipe_names())
        if reason is None and family in reuse:
            runs[family] = reuse[family]
            seen[runs[family]["vocab_size"]] = family
        elif reason is None:
            try:
                zoo = ensure_zoo(family)
                size = vocab_size(zoo.model("llm"))
                if size in seen:
                    reason = f"vocabulary {size} already measured on {seen[size]}"
                else:
                    runs[family] = run_family(family, zoo, [VOCAB_CONTEXT], args)
                    seen[size] = family
            except Exception as e:  # noqa: BLE001 - a family that fails is reported, not fatal
                reason = f"{type(e).__name__}: {e}"
        if reason is not None:
            skipped[family] = reason
            print(f"vocab: skipped {family}: {reason}", file=sys.stderr, flush=True)
            continue
        r = runs[family]["contexts"][str(VOCAB_CONTEXT)]
        print(f"vocab {runs[family]['vocab_size']:>7d} ({family:9s}) draft idle "
              f"{r['draft_ms_idle']:7.1f} ms  verify idle {r['verify_ms_idle']:7.1f} ms  "
              f"draft reply {r['draft_reply_bytes']} B  verify request "
              f"{r['verify_request_bytes']} B  ({time.perf_counter() - t0:.0f} s)", flush=True)
    return vocab_results(runs, skipped)


# ---- plots ----------------------------------------------------------------------------------

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


def plot_scaling(results: dict, block: int, path: Path) -> None:
    """Idle Draft and Verify latency against context length and against vocabulary size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    panels = (("context", "prompt tokens", f"context ({results.get('context_family', '-')})"),
              ("vocab", "vocabulary size", "vocabulary (16-token prompt)"))
    for ax, (what, xlabel, title) in zip(axes, panels):
        for call in ("draft", "verify"):
            by = results.get(f"{call}_ms_by_{what}") or {}
            if by:
                xs = sorted(by, key=int)
                ax.plot([int(x) for x in xs], [by[x] for x in xs], "o-",
                        label=f"{call} of {block} (idle)")
        if ax.lines:
            ax.set_xscale("log")
            ax.minorticks_off()
            xs = sorted({int(x) for line in ax.lines for x in line.get_xdata()})
            ax.set_xticks(xs, [str(x) for x in xs])
            ax.set_ylim(bottom=0)
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("ms (median)")
        ax.set_title(f"latency against {title}")
    fig.suptitle("round cost: what grows with the context and the vocabulary (network off)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ---- main -----------------------------------------------------------------------------------

def main(argv=None) -> int:
    args = parse_args(argv)
    exit_on_sigterm()

    parts = parts_to_run(args.only)
    if "context" in parts:
        check_contexts(args.zoo, args.context_list, args.block)
    zoo = ensure_zoo(args.zoo) if {"settings", "context"} & set(parts) else None
    results: dict = {}
    if "settings" in parts:
        settings = {}
        for name in args.settings.split(","):
            t0 = time.perf_counter()
            settings[name] = run_setting(name, zoo, args)
            s = settings[name]
            print(f"{name:14s} draft idle {s['draft_ms_idle']:7.1f} ms  verify idle "
                  f"{s['verify_ms_idle']:7.1f} ms  after draft {s['verify_ms_after_draft']:7.1f} "
                  f"ms  draft/s {s['draft_calls_per_s']}  verify/s {s['verify_calls_per_s']}  "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
        top_name = "default" if "default" in settings else next(iter(settings))
        results |= {k: settings[top_name][k] for k in ("draft_ms_idle", "verify_ms_idle",
                                                       "verify_ms_after_draft",
                                                       "draft_calls_per_s", "verify_calls_per_s")}
        results["settings"] = settings
    else:
        top_name = None
    reuse: dict[str, dict] = {}
    if "context" in parts:
        t0 = time.perf_counter()
        # The vocab part's session of this family is one more context on the same tiers.
        extra = [VOCAB_CONTEXT] if "vocab" in parts and args.zoo in args.family_list else []
        run = run_family(args.zoo, zoo, sorted({*args.context_list, *extra}), args)
        if extra:
            reuse[args.zoo] = run
        results |= context_results(run, args.context_list)
        for n, r in results["context_detail"].items():
            print(f"context {n:>5s} ({args.zoo}) draft idle {r['draft_ms_idle']:7.1f} ms  "
                  f"verify idle {r['verify_ms_idle']:7.1f} ms", flush=True)
        print(f"context ratio (longest / shortest): draft {results['draft_context_ratio']}  "
              f"verify {results['verify_context_ratio']} (issue 21: verify <= 1.2)  "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    if "vocab" in parts:
        results |= run_vocab(args, reuse)
        print(f"vocab ratios (/ {results['vocab_ratio_base']}): draft "
              f"{results['draft_vocab_ratio']}  verify {results['verify_vocab_ratio']}  "
              f"skipped {results['skipped_families'] or 'none'}", flush=True)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()} | {
        "top_level_setting": top_name, "parts": parts,
        "settings_known": {k: list(v) for k, v in SETTINGS.items()}}
    path = write_result("round_cost", config, results, out_dir=args.out)
    written = [path]
    if "settings" in results:
        plot(results["settings"], path.with_suffix(".png"))
        written.append(path.with_suffix(".png"))
    if {"context", "vocab"} & set(parts):
        scaling = path.with_name(f"{path.stem}-scaling.png")
        plot_scaling(results, args.block, scaling)
        written.append(scaling)
    print(f"wrote {' and '.join(str(p) for p in written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
