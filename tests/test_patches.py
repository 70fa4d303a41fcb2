"""The CPU speculative-decoding fix (patches/hilm_vllm_patches/cpu_spec_decode_expand.py)."""

import torch

import hilm_vllm_patches.cpu_spec_decode_expand as patch
from hilm_vllm_patches.cpu_spec_decode_expand import expand_batch_to_tokens, register


def test_expand_keeps_float_values():
    x = torch.tensor([0.7, 1.3, 0.0])
    cu = torch.tensor([2, 3, 5])
    out = expand_batch_to_tokens(x, cu, 5, replace_from=0.0, replace_to=1.0)
    assert torch.equal(out, torch.tensor([0.7, 0.7, 1.3, 1.0, 1.0]))


def test_vllm_cpu_kernel_is_still_broken_and_register_fixes_it():
    """If this starts failing on the first assertion, upstream fixed it: drop the patch."""
    import vllm.v1.sample.rejection_sampler as rs
    from vllm.platforms import current_platform

    current_platform.register_triton_kernel_overrides()  # what each CPU worker does at start
    # Another test may already have loaded vLLM's plugins in this process (register() ran).
    before = rs.expand_batch_to_tokens
    original = patch.replaced if rs.expand_batch_to_tokens is expand_batch_to_tokens else rs.expand_batch_to_tokens
    assert original is not None and original is not expand_batch_to_tokens
    x, cu = torch.tensor([0.7, 1.3]), torch.tensor([2, 3])
    try:
        broken = original(x, cu, 3)
        assert not torch.allclose(broken, torch.tensor([0.7, 0.7, 1.3])), "fixed upstream?"
        register()
        assert torch.allclose(rs.expand_batch_to_tokens(x, cu, 3), torch.tensor([0.7, 0.7, 1.3]))
    finally:
        rs.expand_batch_to_tokens = before


def test_plugin_is_registered_as_a_vllm_general_plugin():
    from importlib.metadata import entry_points

    eps = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert eps.get("hilm_cpu_spec_decode_fix") == "hilm_vllm_patches.cpu_spec_decode_expand:register"
    assert eps.get("hilm_session_cut") == "hilm_vllm_patches.session_cut:register"


def test_session_cut_wraps_the_schedulers_session_update():
    """Registered in this process (vLLM loads general plugins here too): the scheduler's
    streaming-session update is the plugin's, which calls vLLM's own after the cut."""
    from hilm_vllm_patches import session_cut
    from vllm.v1.core.sched.scheduler import Scheduler

    session_cut.register()
    assert session_cut.installed()
    assert Scheduler._update_request_as_session is session_cut._update_request_as_session
    assert session_cut.replaced is not None and session_cut.replaced.__name__ == (
        "_update_request_as_session")
