"""`hilm bench NAME [ARGS...]` / `python -m hilm_vllm.bench NAME [ARGS...]`: the benchmarks by name.

`vllm-serve` (vLLM's own serving benchmark against the router) ships with the package. The
project's benchmark scripts (`bench/*.py`: sweep, load, round-cost, demo) read the checkout's
`engine_configs/` and write `bench/results/`: they run from a source checkout (`pip install -e
.[bench]`, from the repository root).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

# name -> (module or script, what it measures). "hilm_vllm.*" names are modules of the package;
# others are scripts of the checkout's bench/ (each exposes main(argv) -> int).
BENCHMARKS = {
    "vllm-serve": ("hilm_vllm.bench.vllm_serve",
                   "vLLM's `vllm bench serve` against the router (throughput, TTFT, ITL, "
                   "spec-decode acceptance from /metrics)"),
    "sweep": ("sweep.py", "speed and TR against quality over thresholds and skip rates"),
    "load": ("load.py", "every policy at 1-32 concurrent streams, network off and on"),
    "round-cost": ("round_cost.py", "Draft and Verify latency and call rates, co-located"),
    "demo": ("demo.py", "every policy on the demo family (what `make demo` runs)"),
}


def bench_dir() -> Path:
    """bench/ of the checkout this package lives in (an editable install)."""
    return Path(__file__).resolve().parent.parent.parent / "bench"


def load(name: str):
    target, _ = BENCHMARKS[name]
    if target.startswith("hilm_vllm."):
        return importlib.import_module(target)
    path = bench_dir() / target
    if not path.is_file():
        raise SystemExit(f"error: {path} is missing: `hilm bench {name}` runs a script of the "
                         f"source checkout (git clone, then `pip install -e .[bench]` and run "
                         f"it from the repository root); `hilm bench vllm-serve` works from any "
                         f"install")
    root = str(path.parent.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    return importlib.import_module(f"bench.{path.stem}")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "bench", help="run a benchmark (" + ", ".join(BENCHMARKS) + ")",
        description="Run a benchmark by name; the arguments after its name are its own "
                    "(`hilm bench NAME --help`). The scripts of bench/ run from the repository "
                    "root: they read engine_configs/ and write bench/results/ there.",
        epilog="\n".join(f"  {name:<12} {what}" for name, (_, what) in BENCHMARKS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("script", choices=sorted(BENCHMARKS), metavar="NAME",
                   help="one of: " + ", ".join(sorted(BENCHMARKS)))
    p.add_argument("script_args", nargs=argparse.REMAINDER, metavar="ARGS",
                   help="the benchmark's arguments")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    return int(load(args.script).main(list(args.script_args)) or 0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hilm_vllm.bench")
    add_parser(parser.add_subparsers(dest="command", required=True))
    argv = sys.argv[1:] if argv is None else argv
    return run(parser.parse_args(["bench", *argv]))
