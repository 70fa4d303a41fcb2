"""`hilm calibrate`: its outputs from synthetic records, and one small run on real tiers."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
import yaml

from hilm_vllm import calibrate_cli
from hilm_vllm.cli import build_parser
from hilm_vllm.launch import TierProcess

from tests.drafter.conftest import ENGINE_FLAGS


def parse(*argv):
    return build_parser().parse_args(["calibrate", *argv])


def synthetic_records(a: float, b: float, n: int = 5000, seed: int = 0):
    rng = np.random.default_rng(seed)
    rec = calibrate_cli.Records(prompts=10)
    for _ in range(n):
        u = rng.integers(0, 21) / 20
        beta = float(np.clip(a * u + b, 0, 1))
        q = rng.uniform(0.1, 1)
        p = (1 - beta) * q
        rec.add(u, p, q, bool(rng.random() < 1 - beta))
    return rec


def test_outputs_from_synthetic_records(tmp_path):
    args = parse("--family", "demo", "--rule", "risk-averse")
    fits = {pair.name: calibrate_cli.fit_pair(synthetic_records(0.5 + 0.1 * i, -0.05 * i), 20)
            for i, pair in enumerate(calibrate_cli.PAIRS)}
    slm_ilm = fits["slm->ilm"]
    assert slm_ilm["tokens"] == 5000 and slm_ilm["prompts"] == 10
    assert slm_ilm["fit"]["a"] == pytest.approx(0.5, abs=0.02)
    assert sum(b["count"] for b in slm_ilm["bins"]) == 5000

    doc = calibrate_cli.thresholds_doc(args, fits, tmp_path / "r.json")
    for pair in calibrate_cli.PAIRS:
        assert doc[pair.key] == pytest.approx(fits[pair.name]["fit"]["risk_averse"], abs=1e-6)
    assert doc["warnings"] == [w for w in doc["warnings"] if "t1" not in w]  # t1 is sane here
    bad = doc | {"t1": 1.5, "t2": -0.2}
    assert len(calibrate_cli.threshold_warnings(bad)) == 3  # t1 >= 1, t2 < 0, t2 < t1
    path = tmp_path / "thresholds.yaml"
    calibrate_cli.write_yaml(path, doc)
    text = path.read_text()
    assert text.startswith("# Uncertainty thresholds of the demo family")
    loaded = yaml.safe_load(text)
    assert loaded["rule"] == "risk-averse" and set(loaded["fits"]) == {p.name for p in
                                                                         calibrate_cli.PAIRS}
    png = tmp_path / "plot.png"
    calibrate_cli.plot(png, fits, args)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_tiers(tiny_zoo, slm_tier):
    verifier = TierProcess.start("llm", ["--model", str(tiny_zoo.llm), *ENGINE_FLAGS])
    try:
        verifier.wait_healthy()
        yield slm_tier.grpc_address, verifier.grpc_address
    finally:
        verifier.stop()


def test_calibrate_runs_against_given_tiers(tiny_tiers, tmp_path):
    drafter, verifier = tiny_tiers
    out = tmp_path / "thresholds-tiny.yaml"
    args = parse("--family", "tiny", "--prompts", "3", "--tokens", "6", "--theta-max", "0.5",
                 "--slm-drafter", drafter, "--ilm-drafter", drafter,
                 "--ilm-verifier", verifier, "--llm-verifier", verifier,
                 "--out", str(out), "--results-dir", str(tmp_path),
                 "--records", str(tmp_path / "records.npz"))
    assert asyncio.run(calibrate_cli.calibrate_family(args)) == 0
    doc = yaml.safe_load(out.read_text())
    assert {"t1", "t2", "t_ilm", "rule", "fits"} <= set(doc)
    (json_path,) = tmp_path.glob("calibration-tiny-*.json")
    result = json.loads(json_path.read_text())["results"]["pairs"]["slm->llm"]
    assert result["prompts"] == 3 and 3 <= result["tokens"] <= 3 * 6
    assert 0 <= result["fit"]["acceptance"] <= 1 and result["accepted"] <= result["tokens"]
    assert json_path.with_suffix(".png").is_file()
    saved = np.load(tmp_path / "records.npz")
    assert len(saved["slm->llm/u"]) == result["tokens"] == len(saved["slm->llm/accepted"])
