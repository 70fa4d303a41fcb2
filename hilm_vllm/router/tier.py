"""`hilm-serve --tier router`: the policy loop, its OpenAI-compatible HTTP API and gRPC
`Generate`. The router runs no model; `--model` names the family's tokenizer and chat template.

    hilm-serve --tier router --model zoo:demo/llm --slm H:P --ilm H:P --llm H:P \\
        --policy hilm --thresholds engine_configs/thresholds-demo.yaml --block-size 4 \\
        --latency hilm --port 8000
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from pathlib import Path

from hilm_vllm import codec
from hilm_vllm.netmodel import PRESETS, network_model
from hilm_vllm.proto.hilm.v1 import generate_pb2_grpc
from hilm_vllm.router import metrics
from hilm_vllm.router.admission import AdmissionLimits
from hilm_vllm.router.engine import Router, RouterConfig
from hilm_vllm.router.frontdoor import RequestLimits
from hilm_vllm.router.openai_api import RouterAPI, build_app
from hilm_vllm.router.policy import Policy
from hilm_vllm.router.service import SERVICE_NAME, RouterGenerator
from hilm_vllm.server.flags import add_field_flags, fields_from_args
from hilm_vllm.thresholds import Thresholds
from hilm_vllm.uncertainty import UncertaintyConfig
from hilm_vllm.zoo.registry import resolve_model


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("router")
    g.add_argument("--model", required=True,
                   help="the model family's tokenizer and chat template (a Hugging Face model "
                        "directory or name, or zoo:<recipe>/<tier>)")
    g.add_argument("--served-model-name", default=None,
                   help="the `model` name clients use for the default policy (default: --model)")
    g.add_argument("--llm", required=True, metavar="HOST:PORT[,HOST:PORT...]",
                   help="the LLM tier (gRPC); several addresses are replicas: each session "
                        "stays on one, new ones go to the less loaded of two picked at random, "
                        "a lost replica's sessions reopen on another")
    g.add_argument("--ilm", metavar="HOST:PORT[,...]",
                   help="the ILM tier (needed by hilm, cascade); replicas as --llm")
    g.add_argument("--slm", metavar="HOST:PORT[,...]",
                   help="the drafter tier (needed by every policy but llm-only); replicas as "
                        "--llm")
    g.add_argument("--policy", default=Policy.HILM.value, choices=[p.value for p in Policy],
                   help="default policy of requests that name none (default: %(default)s)")
    g.add_argument("--thresholds", type=Path, default=None,
                   help="calibration YAML written by `hilm calibrate` (t1, t2, t_ilm and the "
                        "uncertainty gate they were fitted with)")
    g.add_argument("--t1", type=float, help="override: u <= t1 is kept on the device")
    g.add_argument("--t2", type=float, help="override: t1 < u <= t2 goes to the ILM, above to "
                                            "the LLM")
    g.add_argument("--t-ilm", type=float, help="override: the ILM forwards its tokens with "
                                               "u > t_ilm to the LLM")
    g.add_argument("--block-size", "-k", type=int, default=4,
                   help="tokens drafted per round (hlm always uses 1) (default: %(default)s)")
    g.add_argument("--optimistic", action=argparse.BooleanOptionalAction, default=True,
                   help="draft the next block while one is being verified (kept only when the "
                        "whole block is accepted and the bonus token is the drafter's next; the "
                        "output distribution does not change). Requests may override it with "
                        "the body field `optimistic`: true drafts ahead every round, false never "
                        "(default: on, gated by --optimistic-min-keep)")
    g.add_argument("--optimistic-min-keep", type=float, default=0.5, metavar="P",
                   help="draft ahead only while the request's estimated chance that the "
                        "draft-ahead is kept (its rate of wholly accepted blocks x its token "
                        "acceptance so far) is at least P; 0 = every round (default: "
                        "%(default)s: a draft-ahead more often kept than thrown away)")
    g.add_argument("--lookahead", type=int, default=None,
                   help="tokens drafted ahead while a block is verified (default: block size "
                        "+ 1, so that a kept optimistic draft is a whole block)")
    g.add_argument("--skip-rate", type=float, default=0.5,
                   help="`rand`: probability of keeping a token unverified (default: %(default)s)")
    g.add_argument("--latency", default="none", choices=sorted(PRESETS),
                   help="network latency preset; hilm = device-edge 10 ms, device-cloud 60 ms, "
                        "edge-cloud 50 ms (default: %(default)s)")
    g.add_argument("--bandwidth", type=float, default=None, metavar="HZ",
                   help="channel bandwidth W; the rate is W log2(1 + SNR) (default: unlimited)")
    g.add_argument("--snr-db", type=float, default=20.0, help="channel SNR (default: %(default)s)")
    g.add_argument("--grpc-port", type=int, default=0,
                   help="gRPC Generate port; 0 picks a free one (default: %(default)s)")
    g.add_argument("--rpc-timeout-s", type=float, default=60.0,
                   help="deadline of one call to a tier; a token stream's deadline per chunk "
                        "(default: %(default)s)")
    g.add_argument("--down-retry-s", type=float, default=10.0,
                   help="a tier whose connection was lost is routed around for this long "
                        "before it is tried again (default: %(default)s)")
    g.add_argument("--recover-s", type=float, default=30.0,
                   help="how long a request of a lossless policy waits for an unreachable "
                        "LLM to answer again before it ends with 503 (default: %(default)s)")

    a = parser.add_argument_group(
        "router API: authentication and limits",
        "Requests over a limit get HTTP 400 (413 for the body size) or gRPC INVALID_ARGUMENT "
        "naming the flag to change.")
    a.add_argument("--api-key", dest="api_key", nargs="+", default=None, metavar="KEY",
                   help="require `Authorization: Bearer KEY` (one of these keys) on /v1/* and on "
                        "gRPC Generate, as `vllm serve --api-key` does; /health stays open "
                        "(default: $VLLM_API_KEY, else no key)")
    add_field_flags(a, RequestLimits(), {
        "max_output_tokens": "largest max_tokens (max_completion_tokens) a request may ask for",
        "max_prompt_tokens": "longest prompt, in tokens after the chat template",
        "max_stop_sequences": "most `stop` strings in one request",
        "max_stop_length": "longest `stop` string, in characters",
        "max_request_bytes": "largest HTTP request body, and prompt text over gRPC, in bytes",
        "max_n": "largest `n` (choices generated for one request)"})
    q = parser.add_argument_group(
        "router API: fair admission",
        "Each running choice holds a session on every tier it uses. At most "
        "--max-active-choices run at once; other requests wait in one queue per client (its API "
        "key, else its address) and are let in round-robin across clients; a client whose queue "
        "is full, or a router whose queue is, gets HTTP 429 with Retry-After (gRPC "
        "RESOURCE_EXHAUSTED with retry-after-s metadata).")
    add_field_flags(q, AdmissionLimits(), {
        "max_active_choices": "choices generated at once, all clients together; keep it within "
                              "the tiers' --max-sessions",
        "max_queued_requests": "requests waiting for admission, all clients together",
        "max_queued_per_client": "requests one client may have waiting"})
    g.add_argument("--disable-log-stats", action="store_true",
                   help="no periodic SpecDecoding log line (as `vllm serve`; its interval is "
                        "$VLLM_LOG_STATS_INTERVAL, default 10 s)")


def api_keys(args: argparse.Namespace) -> list[str]:
    """--api-key, else $VLLM_API_KEY (as `vllm serve`: the flag wins)."""
    return [k for k in (getattr(args, "api_key", None) or [os.environ.get("VLLM_API_KEY")]) if k]


def limits_from_args(args: argparse.Namespace) -> RequestLimits:
    try:
        return fields_from_args(RequestLimits, args)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def thresholds_from_args(args: argparse.Namespace) -> tuple[Thresholds, UncertaintyConfig | None]:
    """--thresholds (the YAML `hilm calibrate` writes) with --t1/--t2/--t-ilm overrides, and the
    gate the thresholds were fitted with (the router opens drafter sessions with it)."""
    th, uncertainty = Thresholds(), None
    if args.thresholds is not None:
        try:
            tf = codec.read_thresholds(args.thresholds)
        except ValueError as e:
            raise SystemExit(f"error: --thresholds {e}") from None
        th, uncertainty = tf.thresholds, tf.uncertainty
        if tf.ilm_uncertainty is not None:
            # t_ilm compares the ILM's own u, which the ILM tier measures with its flags.
            logging.getLogger("hilm.router").info(
                "t_ilm was calibrated with the ILM's %s gate: run the ILM tier with "
                "--uncertainty-gate %s", tf.ilm_uncertainty.gate.value,
                tf.ilm_uncertainty.gate.value)
    try:
        return Thresholds(th.t1 if args.t1 is None else args.t1,
                          th.t2 if args.t2 is None else args.t2,
                          th.t_ilm if args.t_ilm is None else args.t_ilm), uncertainty
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def config_from_args(args: argparse.Namespace) -> RouterConfig:
    thresholds, uncertainty = thresholds_from_args(args)
    try:
        return RouterConfig(
            llm=args.llm, ilm=args.ilm, slm=args.slm, policy=Policy(args.policy),
            thresholds=thresholds, block_size=args.block_size, skip_rate=args.skip_rate,
            optimistic=args.optimistic, optimistic_min_keep=args.optimistic_min_keep,
            lookahead=args.lookahead,
            uncertainty=uncertainty,
            network=network_model(args.latency, args.bandwidth, args.snr_db),
            rpc_timeout_s=args.rpc_timeout_s, down_retry_s=args.down_retry_s,
            recover_s=args.recover_s, admission=fields_from_args(AdmissionLimits, args))
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def load_tokenizer(model: str):
    from transformers import AutoTokenizer  # heavy: loaded when the router starts

    return AutoTokenizer.from_pretrained(resolve_model(model))


def install(grpc_server, runtime, args: argparse.Namespace | None = None) -> list[str]:
    cfg = config_from_args(args)
    router = Router(cfg)
    tokenizer = load_tokenizer(args.model)
    name = args.served_model_name or args.model
    metrics.init_series(name, [t for t, a in (("ilm", cfg.ilm), ("llm", cfg.llm)) if a],
                        cfg.block_size)
    api = RouterAPI(router, tokenizer, name, limits_from_args(args))
    if not getattr(args, "disable_log_stats", False):
        runtime.log_stats_task = asyncio.ensure_future(
            metrics.log_stats_forever(logging.getLogger("hilm.router.stats")))
    runtime.http_app = build_app(api, api_keys=api_keys(args))
    runtime.router = router
    generate_pb2_grpc.add_GeneratorServicer_to_server(RouterGenerator(api), grpc_server)
    th = cfg.thresholds
    logging.getLogger("hilm.router").info(
        "router: policy=%s k=%d t1=%.4g t2=%.4g t_ilm=%.4g network=%s llm=%s ilm=%s slm=%s",
        cfg.policy.value, cfg.block_size, th.t1, th.t2, th.t_ilm, cfg.network.describe(),
        cfg.llm, cfg.ilm, cfg.slm)
    return [SERVICE_NAME]


async def on_shutdown(runtime) -> None:
    task = getattr(runtime, "log_stats_task", None)
    if task is not None:
        task.cancel()
    router = getattr(runtime, "router", None)
    if router is not None:
        await router.close()
