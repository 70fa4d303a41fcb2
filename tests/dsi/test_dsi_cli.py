"""`hilm dsi`: overrides, validation messages, --json, --help."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from hilm_vllm.lab.dsi.config import (ConfigError, EstimateConfig, HeatmapConfig, OfflineConfig,
                                  OnlineConfig, parse_overrides)


def hilm(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hilm_vllm.cli", "dsi", *args],
                          capture_output=True, text=True, timeout=timeout)


def test_overrides_are_typed():
    cfg = parse_overrides(OfflineConfig, ["c=0.05", "a=0.5", "k=5", "N=7", "S=1000",
                                          "repeats=5", "seed=42"])
    assert cfg == OfflineConfig(c=0.05, a=0.5, k=5, N=7, S=1000, repeats=5, seed=42)
    assert isinstance(cfg.k, int) and isinstance(cfg.c, float)


@pytest.mark.parametrize("cls,items,fix", [
    (OfflineConfig, ["c=0"], "0 < c <= 1"),
    (OfflineConfig, ["c=1.5"], "0 < c <= 1"),
    (OfflineConfig, ["a=-0.1"], "0 <= a <= 1"),
    (OfflineConfig, ["a=nan"], "0 <= a <= 1"),
    (OfflineConfig, ["k=0"], "k=1 or more"),
    (OfflineConfig, ["S=0"], "S=1 or more"),
    (OfflineConfig, ["repeats=0"], "repeats=1 or more"),
    (OfflineConfig, ["c=0.01", "k=5", "N=19"], "set N=20 or more"),
    (OfflineConfig, ["k=2.5"], "k=<int>"),
    (OfflineConfig, ["c=fast"], "c=<float>"),
    (OfflineConfig, ["bogus=1"], "the keys are c, a, k, N"),
    (OfflineConfig, ["c"], "not key=value"),
    (OnlineConfig, ["target_ms=0"], "0 < target_ms"),
    (HeatmapConfig, ["ndim=1"], "ndim=2 or more"),
    (HeatmapConfig, ["a_min=0.9", "a_max=0.5"], "a_min < a_max"),
    (EstimateConfig, ["tokens=1"], "tokens=2 or more"),
    (EstimateConfig, ["recipe=huge"], "choose one of"),
])
def test_bad_overrides_say_what_to_fix(cls, items, fix):
    with pytest.raises(ConfigError) as err:
        parse_overrides(cls, items)
    assert fix in str(err.value)


def test_smallest_valid_N_is_accepted():
    assert parse_overrides(OfflineConfig, ["c=0.01", "k=5", "N=20"]).N == 20


def test_offline_json_has_the_keys():
    r = hilm("offline", "--json", "c=0.2", "a=0.8", "k=3", "repeats=3")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)  # the whole of stdout is one object
    for key in ("nonsi", "si", "dsi", "speedup_dsi_over_si", "speedup_dsi_over_nonsi"):
        assert isinstance(out[key], float), key
    assert out["config"] == {"c": 0.2, "a": 0.8, "k": 3, "N": 7, "S": 1000, "repeats": 3,
                             "seed": 42}
    assert out["speedup_dsi_over_si"] == pytest.approx(out["si"] / out["dsi"])
    assert out["nonsi"] == 1000 and out["dsi"] < out["si"] < out["nonsi"]


def test_online_json_has_the_keys():
    r = hilm("online", "--json", "S=20", "target_ms=5", "repeats=1")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    for key in ("nonsi", "si", "dsi", "speedup_dsi_over_si", "speedup_dsi_over_nonsi"):
        assert out[key] > 0, key
    assert out["units"]["nonsi"] == pytest.approx(20, rel=0.25)


@pytest.mark.parametrize("args,fix", [
    (("c=0.1", "k=5", "N=1"), "N >= ceil(1 / (k*c)) = 2; set N=2 or more"),
    (("k=abc",), "k=<int>"),
    (("speed=3",), "unknown key 'speed'"),
])
def test_bad_overrides_exit_2_with_the_fix(args, fix):
    r = hilm("offline", *args)
    assert r.returncode == 2 and r.stdout == ""
    assert fix in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("mode", ["offline", "online", "heatmap", "estimate"])
def test_help_lists_every_key_with_its_default(mode):
    r = hilm(mode, "--help")
    assert r.returncode == 0
    cls = {"offline": OfflineConfig, "online": OnlineConfig, "heatmap": HeatmapConfig,
           "estimate": EstimateConfig}[mode]
    for name, field in cls.__dataclass_fields__.items():
        assert f"{name}={field.default}" in r.stdout, name
