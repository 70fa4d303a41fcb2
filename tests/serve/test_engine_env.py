"""The engine environment hilm-serve sets before vLLM starts: busy-loop window and placement."""

from __future__ import annotations

import time

import pytest

from hilm_vllm.server import engine_env
from hilm_vllm_patches import shm_busy_loop


def test_busy_loop_window_comes_from_the_flag_then_the_environment_then_the_platform():
    env = {}
    assert engine_env.busy_loop_ms(3, is_cpu=True, environ=env) == 3.0
    assert engine_env.busy_loop_ms(None, is_cpu=True, environ=env) == 0.0  # shared cores
    assert engine_env.busy_loop_ms(None, is_cpu=False, environ=env) is None  # vLLM's own
    env[shm_busy_loop.ENV] = "5"
    assert engine_env.busy_loop_ms(None, is_cpu=False, environ=env) == 5.0
    with pytest.raises(ValueError, match="busy-loop"):
        engine_env.busy_loop_ms(-1, is_cpu=True, environ={})


def test_prepare_sets_the_window_for_the_engine_processes():
    env = {}
    changed = engine_env.prepare(7, environ=env)
    assert env[shm_busy_loop.ENV] == "7" and changed[shm_busy_loop.ENV] == "7"
    assert shm_busy_loop.window_from_env(env) == pytest.approx(0.007)


@pytest.mark.parametrize("raw", ["fast", "-3", "1e9"])
def test_a_bad_window_in_the_environment_is_an_error_that_says_what_to_write(raw):
    with pytest.raises(ValueError, match=shm_busy_loop.ENV):
        shm_busy_loop.window_from_env({shm_busy_loop.ENV: raw})


def test_the_patched_wait_parks_on_the_notification_once_the_window_is_over(monkeypatch):
    """With a window of 0 the reader never spins: it polls (blocking) for the writer's ping."""
    from vllm.distributed.device_communicators import shm_broadcast

    calls = []

    class Poller:
        def poll(self, timeout):
            calls.append(("poll", timeout))
            return []

    monkeypatch.setattr(shm_busy_loop, "window_s", 0.0)
    monkeypatch.setattr("vllm.distributed.utils.sched_yield", lambda: calls.append("yield"))
    cond = object.__new__(shm_broadcast.SpinCondition)
    # read 1 ms ago: vLLM (busy_loop_s = 1) would still be spinning
    cond.is_reader, cond.busy_loop_s, cond.last_read = True, 1.0, time.monotonic() - 1e-3
    cond.poller, cond.local_notify_socket, cond.read_cancel_socket = Poller(), object(), object()
    shm_busy_loop.wait(cond, timeout_ms=50)
    assert calls == [("poll", 1)]  # parked, re-checking the flag itself after 1 ms
    monkeypatch.setattr(shm_busy_loop, "window_s", None)  # unset: vLLM's window, so it spins
    calls.clear()
    shm_busy_loop.wait(cond, timeout_ms=50)
    assert calls == ["yield"]


def test_a_parked_reader_rechecks_sooner_the_more_recent_its_last_message():
    """The writer's notification can be lost: a parked reader re-checks the shm flag on its own
    after at most 1 ms right after a message, at most 100 ms once idle, never past the
    caller's timeout."""
    assert shm_busy_loop.park_ms(0.0005, None) == 1
    assert shm_busy_loop.park_ms(0.2, None) == 20
    assert shm_busy_loop.park_ms(30.0, None) == shm_busy_loop.POLL_MAX_MS
    assert shm_busy_loop.park_ms(30.0, 7) == 7


def test_spread_gives_each_engine_its_own_cores_when_there_are_enough():
    tiers = ("slm", "ilm", "llm")
    assert engine_env.placement(tiers, [0, 1, 2, 3]) == {"slm": "0", "llm": "1,2", "ilm": "3"}
    assert engine_env.placement(tiers, list(range(3))) == {"slm": "0", "llm": "1", "ilm": "2"}
    assert engine_env.placement(("slm", "llm"), [0, 1, 2, 3]) == {"slm": "0", "llm": "1,2,3"}


def test_on_two_cores_the_drafter_and_the_llm_are_apart():
    tiers = ("slm", "ilm", "llm")
    assert engine_env.placement(tiers, [0, 1]) == {"slm": "0", "llm": "1", "ilm": "0"}
    assert engine_env.placement(tiers, [0, 1], "device-alone") == {
        "slm": "0", "llm": "1", "ilm": "1"}
    assert engine_env.placement(tiers, [0, 1], "vllm") == dict.fromkeys(tiers, "auto")
    assert engine_env.placement(tiers, [5]) == dict.fromkeys(tiers, "5")
    with pytest.raises(ValueError, match="unknown placement"):
        engine_env.placement(tiers, [0, 1], "random")


def test_on_gpu_the_v1_runner_and_vllms_own_sampler_are_chosen_unless_the_user_chose(
        monkeypatch):
    from vllm.platforms import current_platform

    monkeypatch.setattr(current_platform, "is_cpu", lambda: False)
    env = {}
    engine_env.prepare(None, environ=env)
    assert env == {"VLLM_USE_V2_MODEL_RUNNER": "0", "VLLM_USE_FLASHINFER_SAMPLER": "0"}
    env = {"VLLM_USE_V2_MODEL_RUNNER": "1"}
    engine_env.prepare(None, environ=env)
    assert env["VLLM_USE_V2_MODEL_RUNNER"] == "1"  # the user's choice stands
