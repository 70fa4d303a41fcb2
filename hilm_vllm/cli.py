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

# Subcommand modules, in --help order.
SUBCOMMANDS = (
    "hilm_vllm.zoo.cli",
    "hilm_vllm.dsi.cli",
    "hilm_vllm.calibrate_cli",
    "hilm_vllm.chat_cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hilm",
        description="hilm-vllm tools: demo model zoo, distributed speculative inference, ...",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMANDS:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
