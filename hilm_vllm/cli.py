"""`hilm`: the project's command line (up, zoo, dsi, calibrate, chat, bench, ...).

Each subcommand lives in its own module exposing ``add_parser(subparsers)``, which registers
the subcommand and sets ``func(args) -> int`` as its handler. Modules are imported here, so a
subcommand module must keep heavy imports (torch, vllm, ray) inside its handler: ``hilm --help``
stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from hilm_vllm.lab import bench

# Subcommand modules, in --help order.
SUBCOMMANDS = (
    "hilm_vllm.up",
    "hilm_vllm.zoo.cli",
    "hilm_vllm.lab.dsi.cli",
    "hilm_vllm.lab.calibrate_cli",
    "hilm_vllm.chat_cli",
)


# `hilm bench NAME [ARGS...]`: hilm_vllm.lab.bench (also `python -m hilm_vllm.lab.bench`).
BENCH_SCRIPTS = bench.BENCHMARKS
load_bench = bench.load_benchmark
run_bench = bench.run
add_bench_parser = bench.add_parser


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
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        if not getattr(args, "accepts_unknown", False):
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        args.unknown = unknown  # `hilm up`: the router's flags
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
