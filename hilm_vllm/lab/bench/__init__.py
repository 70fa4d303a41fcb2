"""`hilm bench NAME [ARGS...]` / `python -m hilm_vllm.lab.bench NAME [ARGS...]`: the benchmarks by name.

Every benchmark is a module of this package with `main(argv) -> int`, so an installed package
runs them all; `bench/NAME.py` in the source checkout runs the same module (`python
bench/demo.py`). They write `bench/results/` under the current directory and find the family's
engine configs in `./engine_configs/`, else the copies shipped in the package
(`hilm_vllm.stack.find_config`). Most need the `[bench]` extra (plots, quality scoring, Locust).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from hilm_vllm.lab.benchjson import RESULTS_DIR
from hilm_vllm.zoo.recipes import recipe_names

# name -> (module of this package, what it measures)
BENCHMARKS = {
    "vllm-serve": ("vllm_serve",
                   "vLLM's `vllm bench serve` against the router (throughput, TTFT, ITL, "
                   "spec-decode acceptance from /metrics)"),
    "demo": ("demo", "every policy on the demo family (what `make demo` runs)"),
    "sweep": ("sweep", "speed and TR against quality over thresholds and skip rates"),
    "load": ("load", "every policy at 1-32 concurrent streams, network off and on"),
    "cloud-cost": ("cloud_cost", "each tier's CPU per generated token (the cloud's cost) against "
                                 "concurrency, every policy and vllm-spec"),
    "profile": ("profile", "py-spy of every tier process while a policy runs under load: the "
                           "top frames per process, beside each tier's CPU per token"),
    "soak": ("soak", "Locust users for minutes: failures, memory, sessions, TTFT, ITL"),
    "faults": ("faults", "tiers killed, restarted and stopped under a soak load"),
    "round-cost": ("round_cost", "Draft and Verify latency and call rates, co-located"),
    "verify-cost": ("verify_cost", "one verification round per block size and context"),
    "proposal": ("proposal", "acceptance of the drafter's truncated proposal against its bytes "
                             "(exact expectations, per family)"),
    "gpu-check": ("gpu_check", "on a CUDA machine: install, device tests, bf16 tiers with the "
                               "exactness tests, vLLM's serving benchmark (a dry run elsewhere)"),
    "replicas": ("replicas", "LLM replicas behind one router: sessions per replica, tokens/s, "
                             "and one replica SIGKILLed under load (failover)"),
    "drafter-overhead": ("drafter_overhead", "drafter throughput with and without the "
                                             "uncertainty hook"),
}


def add_common_args(p: argparse.ArgumentParser, zoo_help: str = "model family") -> None:
    """The flags every benchmark shares, declared once: `--zoo` (a recipe of the zoo, built
    first when missing) and `--out` (the results folder; `--out-dir` is the same flag)."""
    from pathlib import Path

    p.add_argument("--zoo", default="demo", choices=recipe_names(),
                   help=f"{zoo_help} (default: demo)")
    p.add_argument("--out", "--out-dir", dest="out", type=Path, default=RESULTS_DIR,
                   help="results folder (default: %(default)s, under the current directory)")


def load_benchmark(name: str):
    """The benchmark's module (imported now: its dependencies are checked here)."""
    module, _ = BENCHMARKS[name]
    try:
        return importlib.import_module(f"{__name__}.{module}")
    except ModuleNotFoundError as e:
        raise SystemExit(f"error: `hilm bench {name}` needs {e.name!r}: install the benchmark "
                         f"extra (pip install 'hilm-vllm[bench]')") from None


def add_parser(sub) -> None:
    p = sub.add_parser(
        "bench", help="run a benchmark (" + ", ".join(BENCHMARKS) + ")",
        description="Run a benchmark by name; the arguments after its name are its own "
                    "(`hilm bench NAME --help`). Results go to ./bench/results/.",
        epilog="\n".join(f"  {name:<17} {what}" for name, (_, what) in BENCHMARKS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("script", choices=sorted(BENCHMARKS), metavar="NAME",
                   help="one of: " + ", ".join(sorted(BENCHMARKS)))
    p.add_argument("script_args", nargs=argparse.REMAINDER, metavar="ARGS",
                   help="the benchmark's arguments")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    module = load_benchmark(args.script)
    sys.argv[0] = f"hilm bench {args.script}"  # the benchmark's --help and errors name it so
    return int(module.main(list(args.script_args)) or 0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hilm_vllm.lab.bench")
    add_parser(parser.add_subparsers(dest="command", required=True))
    argv = sys.argv[1:] if argv is None else argv
    return run(parser.parse_args(["bench", *argv]))
