"""The slm tier's flags and engine defaults as `hilm-serve` parses them."""

from __future__ import annotations

import pytest

from hilm_vllm.tiers import Tier
from hilm_vllm.drafter import tier
from hilm_vllm.serve import build_parser
from hilm_vllm.uncertainty import Gate, Perturbation


def parse(*argv):
    return build_parser(Tier.SLM).parse_args(["--tier", "slm", "--model", "m", *argv])


def test_engine_defaults_install_the_hooks_with_the_types_vllm_expects():
    from vllm.engine.arg_utils import AsyncEngineArgs

    args = parse()
    assert args.logits_processors == ["hilm_vllm.drafter.processor:UncertaintyProcessor"]
    engine_args = AsyncEngineArgs.from_cli_args(args)
    assert engine_args.worker_extension_cls == "hilm_vllm.drafter.worker.DrafterWorkerExtension"
    from vllm.utils.import_utils import resolve_obj_by_qualname

    assert resolve_obj_by_qualname(engine_args.worker_extension_cls).__name__ == \
        "DrafterWorkerExtension"


def test_drafter_flags_become_settings():
    s = tier.settings_from_args(parse(
        "--max-sessions", "5", "--session-ttl-s", "30", "--max-draft-tokens", "12",
        "--draft-top-k", "50", "--uncertainty-gate", "var-entropy", "--uncertainty-samples", "8",
        "--theta-max", "1.5", "--perturbation", "grid"))
    assert (s.max_sessions, s.session_ttl_s, s.max_draft_tokens, s.draft_top_k) == (5, 30, 12, 50)
    u = s.uncertainty
    assert (u.gate, u.num_samples, u.theta_max, u.perturbation) == (
        Gate.VAR_ENTROPY, 8, 1.5, Perturbation.GRID)
    assert tier.settings_from_args(parse()) == tier.DrafterSettings()


@pytest.mark.parametrize("flags", [["--draft-top-k", "-1"], ["--uncertainty-samples", "0"],
                                   ["--theta-max", "0"], ["--max-sessions", "0"]])
def test_bad_flag_values_exit_with_a_message(flags):
    with pytest.raises(SystemExit, match="tier slm"):
        tier.settings_from_args(parse(*flags))


def test_the_v1_runner_is_required_off_cpu(monkeypatch):
    from vllm import envs
    from vllm.platforms import current_platform

    tier.check_vllm()  # this CPU build passes
    monkeypatch.setattr(current_platform, "is_cpu", lambda: False)
    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
    if hasattr(envs, "__getattr__") and hasattr(envs.__getattr__, "cache_clear"):
        envs.__getattr__.cache_clear()
    with pytest.raises(SystemExit, match="VLLM_USE_V2_MODEL_RUNNER=0"):
        tier.check_vllm()
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "0")
    if hasattr(envs, "__getattr__") and hasattr(envs.__getattr__, "cache_clear"):
        envs.__getattr__.cache_clear()
    tier.check_vllm()
