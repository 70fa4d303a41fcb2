"""What `hilm-serve --tier llm|ilm` loads (see serve.TIER_MODULES): engine defaults, the tier's
flags, its gRPC services, and the worker hook installed once the engine is up."""

from __future__ import annotations

import argparse
import weakref

import grpc

from hilm_vllm.errors import Unavailable
from hilm_vllm.server import busy
from hilm_vllm.server.flags import (add_session_args, add_truncation_args, add_uncertainty_args,
                                    truncation_from_args, uncertainty_from_args)
from hilm_vllm.verifier.core import Verifier, VerifierSettings
from hilm_vllm.verifier.service import add_services

# vLLM resolves this dotted path in its worker process and mixes the class into the worker.
WORKER_EXTENSION = "hilm_vllm.verifier.extension.VerifierTierExtension"
ENGINE_DEFAULTS: dict = {"worker_extension_cls": WORKER_EXTENSION}

# Per running tier (one per TierRuntime): its settings, and its Verifier once the engine is up.
_TIERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class _TierState:
    def __init__(self, settings: VerifierSettings):
        self.settings = settings
        self.verifier: Verifier | None = None

    def get(self) -> Verifier:
        if self.verifier is None:
            raise Unavailable("the engine is still starting: retry when health is SERVING")
        return self.verifier


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    """The verifier tier's own flags (next to vLLM's engine flags); serve.py then calls
    install(..., args=the parsed namespace)."""
    d = VerifierSettings()
    group = parser.add_argument_group("verifier tier")
    add_session_args(group, d)
    group.add_argument("--verify-batch-window-ms", type=float, default=d.batch_window_ms,
                       help="hold each Verify up to this many ms so that the verifications of "
                            "several sessions enter the engine together and share one step "
                            "(each step has a fixed cost; an engine that is not saturated "
                            "otherwise runs a step per Verify): less engine CPU per token for "
                            "at most this much latency per round; 0 = off "
                            "(default: %(default)s)")
    group.add_argument("--max-block", type=int, default=d.max_block,
                       help="draft tokens per Verify at most (default: %(default)s)")
    # The verifier's own uncertainty of the tokens it emits (VerifyRequest.return_emitted), with
    # the drafter's gates; a request's UncertaintyConfig overrides what it sets.
    add_uncertainty_args(group, d.uncertainty, "default gate of emitted tokens' uncertainty")
    add_truncation_args(group, "emit", d.emit_truncation,
                        "a Verify that asks for its emitted tokens' rows (return_emitted: the "
                        "ILM under hilm and cascade) verifies against this tier's p cut so; "
                        "the row it returns")

def settings_from_args(args: argparse.Namespace | None) -> VerifierSettings:
    if args is None:
        return VerifierSettings()
    if args.max_sessions < 1 or args.session_ttl_s <= 0 or args.max_block < 1:
        raise SystemExit("error: --max-sessions and --max-block must be >= 1 and "
                         "--session-ttl-s > 0")
    try:  # namespaces built without these flags (older callers) keep the defaults
        uncertainty = uncertainty_from_args(args, VerifierSettings().uncertainty)
    except ValueError as e:
        raise SystemExit(f"error: hilm-serve --tier llm|ilm: {e} (flags --uncertainty-samples, "
                         f"--theta-max)") from e
    d = VerifierSettings()
    try:
        return VerifierSettings(
            args.max_sessions, args.session_ttl_s, args.max_block, uncertainty,
            max_sessions_per_client=getattr(args, "max_sessions_per_client",
                                            d.max_sessions_per_client),
            max_client_samples=getattr(args, "max_uncertainty_samples", d.max_client_samples),
            exempt_principals=getattr(args, "exempt_principals", d.exempt_principals),
            emit_truncation=truncation_from_args(args, "emit", d.emit_truncation),
            batch_window_ms=getattr(args, "verify_batch_window_ms", d.batch_window_ms))
    except ValueError as e:
        raise SystemExit(f"error: hilm-serve --tier llm|ilm: {e}") from e


def install(server: grpc.aio.Server, runtime, args: argparse.Namespace | None = None) -> list[str]:
    state = _TIERS[runtime] = _TierState(settings_from_args(args))
    return add_services(server, state.get)


async def on_engine_ready(runtime) -> None:

    state = _TIERS[runtime]
    state.verifier = await Verifier.start(runtime.engine, state.settings)
    await busy.start(runtime, runtime.cfg.tier.value)
