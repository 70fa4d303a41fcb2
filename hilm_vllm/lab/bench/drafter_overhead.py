"""Drafter throughput with and without the uncertainty hook, per gate and K.

    .venv/bin/python bench/drafter_overhead.py [--zoo demo] [--repeats 20] [--sessions 1]

One in-process vLLM engine (VLLM_ENABLE_V1_MULTIPROCESSING=0, the drafter's processor and worker
extension installed) drafts blocks of --block tokens from a --context-token context, for
--sessions concurrent sessions. "no-processor" runs on a second engine built without the
processor; "off" requests do not opt in (the processor returns at once); the others carry
extra_args["hilm_draft"] and are read back with one collective_rpc per draft, exactly as the
drafter tier does. Conditions are interleaved round-robin so machine
load drifts affect all alike; medians over --repeats.

Reported per condition: drafted tokens/s, ms per token, the hook's share of the drafter's time
per token, (t - t_no_processor) / t, and the processor's own apply time per drafted token (from
the worker's counters) as a share of t. Writes bench/results/drafter-overhead-<UTC>.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import uuid

from hilm_vllm.lab.bench import add_common_args
from hilm_vllm.lab.benchjson import write_result
from hilm_vllm.zoo import ensure_zoo

CONDITIONS = [  # (name, extra "uncertainty" dict or None for the hook off)
    ("no-processor", None),  # a second engine without the drafter's processor at all
    ("off", None),
    ("perturbed-K5", {"gate": "perturbed", "num_samples": 5}),
    ("perturbed-K10", {"gate": "perturbed", "num_samples": 10}),
    ("perturbed-K20", {"gate": "perturbed", "num_samples": 20}),
    ("perturbed-K40", {"gate": "perturbed", "num_samples": 40}),
    ("perturbed-K20-grid", {"gate": "perturbed", "num_samples": 20, "perturbation": "grid"}),
    ("entropy", {"gate": "entropy"}),
    ("var-entropy", {"gate": "var-entropy"}),
    ("max-prob", {"gate": "max-prob"}),
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(p, "model family whose SLM drafts")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--block", type=int, default=8, help="tokens per Draft (default: 8)")
    p.add_argument("--sessions", type=int, default=1, help="concurrent drafts (default: 1)")
    p.add_argument("--context-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    return p.parse_args(argv)


def make_engine(model_dir, hooked: bool = True):
    from vllm import LLM

    hooks = dict(logits_processors=["hilm_vllm.drafter.processor:UncertaintyProcessor"],
                 worker_extension_cls="hilm_vllm.drafter.worker.DrafterWorkerExtension")
    return LLM(model=str(model_dir), dtype="float32", enforce_eager=True, block_size=32,
               kv_cache_memory_bytes=128 << 20, max_model_len=1024, max_num_seqs=16, seed=0,
               enable_prefix_caching=True, **(hooks if hooked else {}))


def draft_once(llm, contexts, uncertainty, args) -> tuple[float, int]:
    """One Draft per context (concurrently); returns (seconds, tokens drafted)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    # loads torch / vLLM: only when it runs
    from hilm_vllm.drafter.processor import DRAFT_ARG, DraftOptions
    from hilm_vllm.sampling import SamplingSpec  # loads torch / vLLM: only when it runs
    from hilm_vllm.uncertainty import UncertaintyConfig  # loads torch / vLLM: only when it runs

    keys = [uuid.uuid4().hex for _ in contexts]
    params = []
    for i, (key, ctx) in enumerate(zip(keys, contexts)):
        extra = None
        if uncertainty is not None:
            opts = DraftOptions(key, seed=i, base=len(ctx),
                                uncertainty=UncertaintyConfig(**uncertainty),
                                spec=SamplingSpec(args.temperature))
            extra = {DRAFT_ARG: opts.to_extra_args()}
        params.append(SamplingParams(temperature=args.temperature, seed=i, max_tokens=args.block,
                                     ignore_eos=True, detokenize=False, extra_args=extra))
    t0 = time.perf_counter()
    outs = llm.generate([TokensPrompt(prompt_token_ids=c) for c in contexts], params,
                        use_tqdm=False)
    if uncertainty is not None:
        for key in keys:
            llm.collective_rpc("hilm_pop_draft", args=(key,))
    return time.perf_counter() - t0, sum(len(o.outputs[0].token_ids) for o in outs)


def measure(llm, plain, contexts, args) -> dict:
    times = {name: [] for name, _ in CONDITIONS}
    apply_s = {name: 0.0 for name, _ in CONDITIONS}
    tokens = {name: 0 for name, _ in CONDITIONS}
    engine = {name: plain if name == "no-processor" else llm for name, _ in CONDITIONS}
    for name, unc in CONDITIONS:  # warm-up (prefix cache, allocator)
        draft_once(engine[name], contexts, unc, args)
    for _ in range(args.repeats):
        for name, unc in CONDITIONS:
            llm.collective_rpc("hilm_drafter_stats", kwargs={"reset": True})
            seconds, n = draft_once(engine[name], contexts, unc, args)
            times[name].append(seconds / n)
            tokens[name] += n
            apply_s[name] += llm.collective_rpc("hilm_drafter_stats")[0]["apply_s"]
    off = statistics.median(times["no-processor"])
    results = {}
    for name, _ in CONDITIONS:
        per_token = statistics.median(times[name])
        results[name] = {
            "ms_per_token": per_token * 1e3, "tokens_per_s": 1 / per_token,
            "ms_per_token_p10": sorted(times[name])[len(times[name]) // 10] * 1e3,
            "hook_share": (per_token - off) / per_token,
            "processor_ms_per_token": apply_s[name] / tokens[name] * 1e3,
            "processor_share": apply_s[name] / tokens[name] / per_token,
        }
    return results


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

    zoo = ensure_zoo(args.zoo)
    llm = make_engine(zoo.slm)
    plain = make_engine(zoo.slm, hooked=False)
    vocab = llm.llm_engine.model_config.get_vocab_size()
    tok = llm.get_tokenizer()
    text = "\n".join(p["prompt"] + p["reference"] for p in zoo.heldout_prompts())
    ids = tok.encode(text)
    contexts = [ids[i * 97: i * 97 + args.context_tokens] for i in range(args.sessions)]
    results = measure(llm, plain, contexts, args)
    config = vars(args) | {"model": str(zoo.slm), "vocab_size": vocab,
                           "conditions": dict(CONDITIONS), "engine": "in-process vllm.LLM"}
    path = write_result("drafter-overhead", config, results,
                        args.out)
    print(f"{'condition':<20} {'tok/s':>8} {'ms/tok':>8} {'hook share':>11} {'processor':>10}")
    for name, r in results.items():
        print(f"{name:<20} {r['tokens_per_s']:8.1f} {r['ms_per_token']:8.3f} "
              f"{r['hook_share']:11.1%} {r['processor_share']:10.1%}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
