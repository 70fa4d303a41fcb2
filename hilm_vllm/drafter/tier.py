"""`hilm-serve --tier slm`: the Drafter service on a vLLM engine with the uncertainty hooks.

The hooks target vLLM 0.32.0's V1 model runner: the CPU build always uses it; on GPU, 0.32
defaults to Model Runner V2, whose logits-processor interface differs, so the drafter refuses to
start there unless VLLM_USE_V2_MODEL_RUNNER=0.
"""

from __future__ import annotations

import argparse
import weakref

from hilm_vllm.drafter.core import DrafterSettings, DraftResults
from hilm_vllm.drafter.service import SERVICE_NAME, DrafterServicer
from hilm_vllm.proto.hilm.v1 import drafter_pb2_grpc
from hilm_vllm.server import busy
from hilm_vllm.server.flags import (add_session_args, add_truncation_args, add_uncertainty_args,
                                    truncation_from_args, uncertainty_from_args)

PINNED_VLLM = "0.32.0"

ENGINE_DEFAULTS = {
    # A list, as EngineArgs.logits_processors (entries "<module>:<class>").
    "logits_processors": ["hilm_vllm.drafter.processor:UncertaintyProcessor"],
    # A dotted name: vLLM resolves it with rsplit(".", 1), not "module:class".
    "worker_extension_cls": "hilm_vllm.drafter.worker.DrafterWorkerExtension",
}


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    d = DrafterSettings()
    g = parser.add_argument_group("drafter (tier slm)")
    add_session_args(g, d)
    g.add_argument("--max-draft-tokens", type=int, default=d.max_draft_tokens,
                   help="largest block one Draft may ask for (default: %(default)s)")
    # Defaults measured on the demo family: acceptance within 1% of the untruncated
    # proposal's (docs/architecture.md, "Proposals")
    add_truncation_args(g, "draft", d.truncation, "the proposal q of each drafted token")
    add_uncertainty_args(g, d.uncertainty, "default gate of sessions that do not pick one")


def settings_from_args(args: argparse.Namespace) -> DrafterSettings:
    d = DrafterSettings()
    try:
        t = truncation_from_args(args, "draft", d.truncation)
        return DrafterSettings(
            max_sessions=args.max_sessions, session_ttl_s=args.session_ttl_s,
            max_draft_tokens=args.max_draft_tokens, draft_top_k=t.cap, draft_eps=t.eps,
            uncertainty=uncertainty_from_args(args, d.uncertainty),
            max_sessions_per_client=getattr(args, "max_sessions_per_client",
                                            d.max_sessions_per_client),
            max_client_samples=getattr(args, "max_uncertainty_samples", d.max_client_samples),
            exempt_principals=getattr(args, "exempt_principals", d.exempt_principals))
    except ValueError as e:
        raise SystemExit(f"error: hilm-serve --tier slm: {e}") from e


def check_vllm() -> None:
    """The hooks are written against vLLM 0.32.0's V1 runner: refuse anything else clearly."""
    import vllm
    from vllm import envs
    from vllm.platforms import current_platform

    if vllm.__version__ != PINNED_VLLM:
        raise SystemExit(f"error: the drafter's hooks are pinned to vLLM {PINNED_VLLM}, "
                         f"found {vllm.__version__}: install vllm=={PINNED_VLLM}")
    if not current_platform.is_cpu() and envs.VLLM_USE_V2_MODEL_RUNNER is not False:
        raise SystemExit("error: the drafter's logits processor implements vLLM's V1 interface; "
                         "on this platform vLLM 0.32 may pick Model Runner V2: set "
                         "VLLM_USE_V2_MODEL_RUNNER=0")


# The servicer of each running tier, for on_engine_ready (one per TierRuntime).
_SERVICERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def install(grpc_server, runtime, args: argparse.Namespace | None = None) -> list[str]:

    check_vllm()
    settings = settings_from_args(args) if args is not None else DrafterSettings()
    servicer = _SERVICERS[runtime] = DrafterServicer(runtime, settings)
    drafter_pb2_grpc.add_DrafterServicer_to_server(servicer, grpc_server)
    return [SERVICE_NAME]


async def on_engine_ready(runtime) -> None:
    """Open the push channel, install the worker's step hook on it, and fail fast when the
    engine runs without the hooks (e.g. overridden engine flags)."""

    results = DraftResults()
    try:
        await runtime.engine.collective_rpc(
            "hilm_install_drafter", args=(results.channel.address, results.channel.token))
        info = (await runtime.engine.collective_rpc("hilm_drafter_info"))[0]
    except Exception as e:
        results.close()
        raise SystemExit(f"error: the drafter's worker extension is missing or refused to "
                         f"install ({e}); keep --worker-extension-cls "
                         f"{ENGINE_DEFAULTS['worker_extension_cls']}") from e
    if runtime in _SERVICERS:
        _SERVICERS[runtime].results = results

    await busy.start(runtime, "slm")
    if not info["installed"] or ".worker.gpu." in info["runner"]:
        raise SystemExit(f"error: the drafter's logits processor is not active (runner "
                         f"{info['runner']}, processors {info['processors']}); keep "
                         f"--logits-processors {ENGINE_DEFAULTS['logits_processors'][0]} and, on "
                         f"GPU, set VLLM_USE_V2_MODEL_RUNNER=0")
