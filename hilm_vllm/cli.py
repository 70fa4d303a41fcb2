"""`hilm`: the project's command line (zoo, dsi, calibrate, chat, ...).

Each subcommand lives in its own module exposing ``add_parser(subparsers)``, which registers
the subcommand and sets ``func(args) -> int`` as its handler. Modules are imported here, so a
subcommand module must keep heavy imports (torch, vllm, ray) inside its handler: ``hilm --help``
stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

# Subcommand modules, in --help order.
SUBCOMMANDS = (
    "hilm_vllm.zoo.cli",
    "hilm_vllm.dsi.cli",
    "hilm_vllm.calibrate_cli",
    "hilm_vllm.chat_cli",
)


# `hilm bench NAME [ARGS...]`: the benchmark scripts of bench/ by name; each exposes
# main(argv) -> int and is run from the repository it belongs to (its paths are relative to the
# repository root: run from there). Add a script here to make it a `hilm bench` command.
BENCH_SCRIPTS = {
    "sweep": ("sweep.py", "speed and TR against quality over thresholds and skip rates"),
    "load": ("load.py", "every policy at 1-32 concurrent streams, network off and on"),
    "round-cost": ("round_cost.py", "Draft and Verify latency and call rates, co-located"),
}


def bench_dir() -> Path:
    """bench/ of the checkout this package lives in (an editable install)."""
    return Path(__file__).resolve().parent.parent / "bench"


def add_bench_parser(sub) -> None:
    p = sub.add_parser(
        "bench", help="run a benchmark of bench/ (" + ", ".join(BENCH_SCRIPTS) + ")",
        description="Run a benchmark script of bench/ by name; the arguments after its name "
                    "are the script's own (`hilm bench NAME --help`). Run from the repository "
                    "root: the scripts read engine_configs/ and write bench/results/ there.",
        epilog="\n".join(f"  {name:<12} bench/{script}: {what}"
                          for name, (script, what) in BENCH_SCRIPTS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("script", choices=sorted(BENCH_SCRIPTS), metavar="NAME",
                   help="one of: " + ", ".join(sorted(BENCH_SCRIPTS)))
    p.add_argument("script_args", nargs=argparse.REMAINDER, metavar="ARGS",
                   help="the script's arguments")
    p.set_defaults(func=run_bench)


def load_bench(name: str):
    """Import bench/<script> as the module `bench.<stem>` (so it can import bench.demo)."""
    script, _ = BENCH_SCRIPTS[name]
    path = bench_dir() / script
    if not path.is_file():
        raise SystemExit(f"error: {path} is missing: `hilm bench` needs the source checkout "
                         f"(pip install -e .)")
    root = str(path.parent.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    return importlib.import_module(f"bench.{path.stem}")


def run_bench(args: argparse.Namespace) -> int:
    return int(load_bench(args.script).main(list(args.script_args)) or 0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hilm",
        description="hilm-vllm tools: demo model zoo, distributed speculative inference, ...",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMANDS:
        importlib.import_module(name).add_parser(sub)
    add_bench_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
