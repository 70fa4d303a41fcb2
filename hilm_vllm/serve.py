"""`hilm-serve --tier {llm,ilm,slm,router}`: start one tier (`--tier all`: `hilm up`, every tier
and the router in one command).

vLLM's own engine flags pass through (`--model`, `--max-model-len`, `--tensor-parallel-size`,
...), parsed by vLLM's parser, and `--config engine_configs/X.yaml` supplies defaults exactly as
it does for `vllm serve` (command line > config file > built-in defaults).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import os
import sys

from hilm_vllm import up
from hilm_vllm.config import ServeConfig
from hilm_vllm.server import engine_env, memtrace
from hilm_vllm.server.grpc_limits import (DEFAULT_MAX_MESSAGE_MB, MAX_MESSAGE_ENV,
                                          MAX_MESSAGE_FLAG, max_message_bytes)
from hilm_vllm.server.runtime import TierRuntime
from hilm_vllm.server.security import (add_security_args, security_from_args,
                                       set_process_security)
from hilm_vllm.tiers import Tier
from hilm_vllm.zoo.registry import resolve_model

ALL = "all"  # --tier all: the whole system (hilm_vllm.up)

# Each engine tier's module provides `ENGINE_DEFAULTS` (engine arguments the tier's hooks need,
# e.g. its worker extension; the command line and --config still override them),
# `install(grpc_server, runtime) -> [service names]`, and optionally
# `async on_engine_ready(runtime)` and `add_cli_args(parser)` (the tier's own flags; such a
# module's install is then called with `args=` the parsed namespace). Imported only for the tier
# being served.
TIER_MODULES: dict[Tier, str] = {
    Tier.LLM: "hilm_vllm.verifier.tier",
    Tier.ILM: "hilm_vllm.verifier.tier",
    Tier.SLM: "hilm_vllm.drafter.tier",
    Tier.ROUTER: "hilm_vllm.router.tier",
}


def _tier_module(tier: Tier):
    import importlib

    name = TIER_MODULES.get(tier)
    try:
        return importlib.import_module(name) if name else None
    except ModuleNotFoundError as e:
        if not (e.name and (name == e.name or name.startswith(e.name + "."))):
            raise  # a missing dependency inside the tier module is a real error
        return None  # this tier's services are not part of this build yet


def _tier_from_argv(argv: list[str]) -> Tier | None:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--tier", choices=[t.value for t in Tier])
    known, _ = pre.parse_known_args(argv)
    return Tier(known.tier) if known.tier else None


def build_parser(tier: Tier | None):
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(
        prog="hilm-serve",
        description="Serve one tier of hilm-vllm. Engine tiers (llm, ilm, slm) take vLLM's "
                    "engine flags; `hilm-serve --tier llm --help` lists them.",
    )
    parser.add_argument("--tier", required=True, choices=[t.value for t in Tier] + [ALL],
                        help="llm: data-center verifier; ilm: edge verifier; slm: device "
                             "drafter; router: the policy loop and OpenAI API; all: the three "
                             "engine tiers and the router, as `hilm up` (`hilm-serve --tier all "
                             "--help`)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    if tier is Tier.ROUTER:  # an OpenAI-compatible server: --port is its HTTP port, as in vLLM
        parser.add_argument("--port", type=int, default=8000,
                            help="HTTP port of the OpenAI API; 0 picks a free one "
                                 "(default: %(default)s)")
    else:
        parser.add_argument("--port", type=int, default=50051,
                            help="gRPC port; 0 picks a free one (default: %(default)s)")
    parser.add_argument(MAX_MESSAGE_FLAG, type=float, default=None, metavar="MB",
                        help="largest gRPC message sent or received, on this tier's server and "
                             "its channels; give every tier and the router the same (sets "
                             f"${MAX_MESSAGE_ENV}; default: it, else {DEFAULT_MAX_MESSAGE_MB})")
    parser.add_argument("--metrics-port", type=int, default=0,
                        help="Prometheus /metrics HTTP port; 0 picks a free one (default: %(default)s)")

    add_security_args(parser)
    if tier is not None and tier.runs_engine:
        from vllm.engine.arg_utils import AsyncEngineArgs

        parser.add_argument(
            "--drain-timeout-s", type=float, default=30.0,
            help="on SIGTERM the tier first drains: OpenSession answers UNAVAILABLE "
                 "(\"draining\"; a router with replicas opens the session on another), the open "
                 "sessions are served until they close or this many seconds pass, then it "
                 "stops (default: %(default)s)")
        parser.add_argument(
            "--engine-busy-loop-ms", type=float, default=None,
            help="how long vLLM's shared-memory queue readers spin after each message before "
                 "they sleep (patches/hilm_vllm_patches/shm_busy_loop.py; sets "
                 "HILM_ENGINE_BUSY_LOOP_MS for the "
                 "engine processes). Default: $HILM_ENGINE_BUSY_LOOP_MS, else 0 on CPU (engines "
                 "that share cores must not spin) and vLLM's own 1000 on GPU")

        AsyncEngineArgs.add_cli_args(parser)
        # KV reuse across rounds comes from the prefix cache: on unless turned off explicitly.
        parser.set_defaults(enable_prefix_caching=True)
        module = _tier_module(tier)
        parser.set_defaults(**getattr(module, "ENGINE_DEFAULTS", {}))
        if hasattr(module, "add_cli_args"):
            module.add_cli_args(parser)
    elif tier is Tier.ROUTER:
        _tier_module(tier).add_cli_args(parser)
    return parser


def engine_args_from(args: argparse.Namespace):
    from vllm.engine.arg_utils import AsyncEngineArgs

    args.model = resolve_model(args.model)
    if args.tokenizer:
        args.tokenizer = resolve_model(args.tokenizer)
    return AsyncEngineArgs.from_cli_args(args)


def _split_all(argv: list[str]) -> list[str] | None:
    """The arguments besides `--tier all` when they ask for it, else None."""
    for i, a in enumerate(argv):
        if a == "--tier" and argv[i + 1:i + 2] == [ALL]:
            return argv[:i] + argv[i + 2:]
        if a == f"--tier={ALL}":
            return argv[:i] + argv[i + 1:]
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if (rest := _split_all(argv)) is not None:
        return up.main(rest, prog="hilm-serve --tier all")
    tier = _tier_from_argv(argv)
    args = build_parser(tier).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(asctime)s [%(name)s] %(message)s")

    memtrace.start_from_env(args.tier)  # HILM_MEMTRACE_S: a diagnostic, off by default
    if args.grpc_max_message_mb is not None:
        os.environ[MAX_MESSAGE_ENV] = str(args.grpc_max_message_mb)
    try:
        max_message_bytes()
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None

    try:  # the router's gRPC Generate takes its HTTP API keys too
        api_keys = (_tier_module(Tier.ROUTER).api_keys(args) if Tier(args.tier) is Tier.ROUTER
                    else ())
        security = security_from_args(args, extra_tokens=api_keys)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    set_process_security(security)  # every channel this process makes uses it

    if Tier(args.tier) is Tier.ROUTER:
        cfg = ServeConfig(tier=Tier.ROUTER, host=args.host, port=args.grpc_port,
                          metrics_port=args.metrics_port, http_port=args.port,
                          security=security)
        module = _tier_module(cfg.tier)
        runtime = TierRuntime(cfg, None, installers=[functools.partial(module.install, args=args)],
                              on_shutdown=[module.on_shutdown])
        asyncio.run(runtime.run())
        return 0
    cfg = ServeConfig(tier=Tier(args.tier), host=args.host, port=args.port,
                      metrics_port=args.metrics_port, security=security,
                      drain_timeout_s=args.drain_timeout_s)
    try:  # before the engine exists: its processes inherit this environment
        engine_env.prepare(args.engine_busy_loop_ms,
                           tensor_parallel_size=args.tensor_parallel_size)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None

    module = _tier_module(cfg.tier)
    installers = [] if module is None else [
        functools.partial(module.install, args=args) if hasattr(module, "add_cli_args")
        else module.install]
    on_ready = [module.on_engine_ready] if hasattr(module, "on_engine_ready") else []
    runtime = TierRuntime(cfg, engine_args_from(args), installers=installers, on_ready=on_ready)
    asyncio.run(runtime.run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
