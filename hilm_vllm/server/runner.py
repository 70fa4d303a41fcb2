"""The one check every worker hook makes before wrapping vLLM's model runner."""

from __future__ import annotations

from hilm_vllm_patches import session_cut

PINNED_VLLM = "0.32.0"  # the hooks wrap private methods of this version's V1 runner


def pushes_results() -> bool:
    """Whether this worker process pushes hook results to the API process. Under tensor
    parallelism every rank runs the hooks (each must record the same emitted tokens); only the
    first rank pushes (the others would send every result again)."""
    try:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

        return get_tensor_model_parallel_rank() == 0
    except (AssertionError, RuntimeError):  # model parallelism not initialised: one process
        return True


def check_v1_runner(runner, hook: str) -> None:
    """Refuse, with the fix in the message, a vLLM version or runner `hook` was not written for."""
    import vllm
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if vllm.__version__.split("+")[0] != PINNED_VLLM:
        raise RuntimeError(f"hilm {hook} supports vLLM {PINNED_VLLM}, found {vllm.__version__}: "
                           f"install vllm=={PINNED_VLLM} (or port the hook)")
    if not isinstance(runner, GPUModelRunner):
        raise RuntimeError(f"hilm {hook} needs vLLM's V1 model runner, found "
                           f"{type(runner).__module__}.{type(runner).__name__}: set "
                           f"VLLM_USE_V2_MODEL_RUNNER=0 in the tier's environment")

    if not session_cut.installed():
        raise RuntimeError(
            f"hilm {hook}: the vLLM plugin hilm_session_cut (entry point group "
            f"vllm.general_plugins) is not loaded in this engine, and sessions that live in the "
            f"engine cannot be cut back without it: reinstall hilm-vllm (pip install -e .); a "
            f"stale hilm_vllm.egg-info on sys.path (the current directory) hides new entry "
            f"points, delete it")
