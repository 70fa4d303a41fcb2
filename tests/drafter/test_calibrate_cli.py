"""`hilm calibrate`: its outputs from synthetic records, refits from saved records, the router
loading what it writes, and one small run on real tiers."""

from __future__ import annotations

import argparse
import asyncio
import json

import numpy as np
import pytest
import yaml

from hilm_vllm import codec
from hilm_vllm.lab import calibrate_cli
from hilm_vllm.cli import build_parser
from hilm_vllm.launch import TierProcess
from hilm_vllm.thresholds import Thresholds

from tests.drafter.conftest import ENGINE_FLAGS


def parse(*argv):
    return build_parser().parse_args(["calibrate", *argv])


def synthetic_records(curve, n: int = 4000, seed: int = 0, steps: int | None = 20):
    """Records whose rejection probability is curve(g), g on 1/steps steps (None: continuous)."""
    rng = np.random.default_rng(seed)
    rec = calibrate_cli.Records(prompts=10)
    for _ in range(n):
        g = rng.integers(0, steps + 1) / steps if steps else rng.random()
        beta = float(np.clip(curve(g), 0, 1))
        q = rng.uniform(0.1, 1)
        p = (1 - beta) * q
        rec.add(g, p, q, bool(rng.random() < 1 - beta))
    return rec


def all_gates(seed: int = 0) -> dict[str, dict[str, calibrate_cli.Records]]:
    """perturbed predicts rejection best (u^2 on steps), entropy less, the others not at all."""
    curves = {"perturbed": lambda g: g**2, "entropy": lambda g: 0.1 + 0.3 * g,
              "var-entropy": lambda g: 0.25, "max-prob": lambda g: 0.4 - 0.3 * g}
    return {gate: {pair.name: synthetic_records(curve, seed=seed + i,
                                                steps=20 if gate == "perturbed" else None)
                   for i, pair in enumerate(calibrate_cli.PAIRS)}
            for gate, curve in curves.items()}


def fit(records, args):
    return calibrate_cli.fit_all(records, args)


def test_all_gates_pick_the_best_auc_and_write_unit_thresholds(tmp_path):
    args = parse("--family", "demo", "--risk-budget", "0.1")
    results = fit(all_gates(), args)
    aucs = {g: results[g]["slm->llm"].cal.auc for g in results}
    assert aucs["perturbed"] > aucs["entropy"] > 0.55 and aucs["max-prob"] < 0.45
    doc = calibrate_cli.thresholds_doc(args, results, tmp_path / "r.json")
    assert doc["uncertainty"]["gate"] == doc["ilm_uncertainty"]["gate"] == "perturbed"
    assert "highest mean AUC" in doc["gate_choice"]["slm"]["why"]
    assert "entropy" in doc["gate_choice"]["slm"]["why"]  # every gate's figure is named
    assert set(doc["auc"]) == set(calibrate_cli.GATES)
    # u^2 on 21 steps with a budget 0.1: skip u <= 0.5 (mean of the squares 0.0875).
    assert doc["t1"] == doc["t2"] == doc["t_ilm"] == pytest.approx(0.525)
    for key in ("t1", "t2", "t_ilm"):
        point = doc["operating_points"][key]
        assert point["met"] and point["risk"] <= 0.1 and point["gate"] == "perturbed"
    fits = doc["fits"]["slm->llm"]
    assert {"a", "b", "risk_averse", "risk_prone", "auc", "monotone"} <= set(fits)
    assert fits["risk_prone"] > 1  # U-HLM's rule leaves [0, 1] on this curve, ours does not

    path = tmp_path / "thresholds.yaml"
    calibrate_cli.write_yaml(path, calibrate_cli.thresholds_file(args, results,
                                                                 tmp_path / "r.json"))
    text = path.read_text()
    tf = codec.read_thresholds(path)  # what the router reads back
    assert tf.thresholds == Thresholds(doc["t1"], doc["t2"], doc["t_ilm"])
    assert tf.uncertainty.gate.value == doc["uncertainty"]["gate"]
    assert text.startswith("# Uncertainty thresholds of the demo family")
    loaded = yaml.safe_load(text)
    assert loaded["rule"] == "risk-budget" and set(loaded["fits"]) == {
        p.name for p in calibrate_cli.PAIRS}

    png = tmp_path / "plot.png"
    calibrate_cli.plot(png, results, args, doc)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_target_tr_sets_t2_and_t1_stays_below_it(tmp_path):
    args = parse("--gate", "entropy", "--target-tr", "0.3", "--risk-budget", "t1=0.3,t_ilm=0.2")
    records = {"entropy": all_gates()["entropy"]}
    doc = calibrate_cli.thresholds_doc(args, fit(records, args), tmp_path / "r.json")
    t2 = doc["operating_points"]["t2"]
    assert t2["met"] and t2["sent"] == pytest.approx(0.3, abs=0.01)
    assert doc["t2"] == pytest.approx(0.7, abs=0.03)  # g uniform: 30% above 0.7
    # t1's budget 0.3 alone would skip more than t2 does: it is lowered to t2, and says so.
    assert doc["t1"] == doc["t2"] and "lowered to t2" in doc["operating_points"]["t1"]["note"]
    assert doc["risk_budget"] == {"t1": 0.3, "t2": 0.1, "t_ilm": 0.2}
    assert doc["uncertainty"]["gate"] == "entropy" and "only gate" in doc["gate_choice"]["slm"][
        "why"]
    assert any("--uncertainty-gate entropy" in w for w in doc["warnings"])


def test_no_usable_budget_and_uhlm_rules_are_explained_not_outside(tmp_path):
    flat = {"perturbed": {p.name: synthetic_records(lambda g: 0.3 - 0.1 * g, seed=i, steps=2)
                          for i, p in enumerate(calibrate_cli.PAIRS)}}
    args = parse("--gate", "perturbed", "--risk-budget", "0.05")
    doc = calibrate_cli.thresholds_doc(args, fit(flat, args), tmp_path / "r.json")
    for key in ("t1", "t2", "t_ilm"):
        assert doc[key] == 0.0 and not doc["operating_points"][key]["met"]
    assert any("already has expected rejection" in w and "> 0.05" in w for w in doc["warnings"])
    assert any("routes nearly at random" in w for w in doc["warnings"])
    rule = parse("--gate", "perturbed", "--rule", "risk-prone")
    doc = calibrate_cli.thresholds_doc(rule, fit(flat, rule), tmp_path / "r.json")
    assert all(0 <= doc[k] <= 1 for k in ("t1", "t2", "t_ilm"))
    assert doc["fits"]["slm->llm"]["risk_prone"] < 0 or doc["fits"]["slm->llm"]["risk_prone"] > 1
    assert any("clipped" in w for w in doc["warnings"])


def test_risk_budget_flag_parses_and_refuses():
    assert calibrate_cli.risk_budgets("0.05") == {"t1": 0.05, "t2": 0.05, "t_ilm": 0.05}
    assert calibrate_cli.risk_budgets("t2=0.2") == {"t1": 0.1, "t2": 0.2, "t_ilm": 0.1}
    for bad in ("1.5", "t3=0.1", "x", "t1=-0.1"):
        with pytest.raises(argparse.ArgumentTypeError):
            calibrate_cli.risk_budgets(bad)
    with pytest.raises(SystemExit):
        parse("--target-tr", "2")


def test_refit_from_saved_records_and_the_router_uses_the_chosen_gate(tmp_path):
    records = all_gates()
    records["entropy"] = {name: synthetic_records(lambda g: g**3, seed=9, steps=None)
                          for name in records["entropy"]}  # now entropy is the best gate
    npz = tmp_path / "records.npz"
    calibrate_cli.save_records(npz, records)
    assert calibrate_cli.load_records(npz)["entropy"]["slm->llm"].u == records["entropy"][
        "slm->llm"].u
    out = tmp_path / "thresholds-synth.yaml"
    args = parse("--family", "synth", "--from-records", str(npz), "--out", str(out),
                 "--results-dir", str(tmp_path), "--risk-budget", "0.05")
    assert asyncio.run(calibrate_cli.calibrate_family(args)) == 0
    doc = yaml.safe_load(out.read_text())
    assert doc["uncertainty"]["gate"] == "entropy"
    (json_path,) = tmp_path.glob("calibration-synth-*.json")
    results = json.loads(json_path.read_text())["results"]
    assert set(results["gates"]) == set(calibrate_cli.GATES)
    assert results["gate_choice"]["slm"]["gate"] == "entropy"
    assert json_path.with_suffix(".png").is_file()

    from hilm_vllm.router import tier

    parser = argparse.ArgumentParser()
    tier.add_cli_args(parser)
    router_args = parser.parse_args(["--model", "m", "--llm", "127.0.0.1:1",
                                     "--thresholds", str(out)])
    thresholds, uncertainty = tier.thresholds_from_args(router_args)
    assert (thresholds.t1, thresholds.t2, thresholds.t_ilm) == (doc["t1"], doc["t2"],
                                                                 doc["t_ilm"])
    assert uncertainty.gate.value == "entropy" and uncertainty.num_samples == 20
    cfg = tier.config_from_args(router_args)
    assert cfg.uncertainty == uncertainty  # what the router opens drafter sessions with


@pytest.fixture(scope="module")
def tiny_tiers(tiny_zoo, slm_tier):
    verifier = TierProcess.start("llm", ["--model", str(tiny_zoo.llm), *ENGINE_FLAGS])
    try:
        verifier.wait_healthy()
        yield slm_tier.grpc_address, verifier.grpc_address
    finally:
        verifier.stop()


def test_calibrate_runs_every_gate_against_given_tiers(tiny_tiers, tmp_path):
    drafter, verifier = tiny_tiers
    out = tmp_path / "thresholds-tiny.yaml"
    args = parse("--family", "tiny", "--prompts", "3", "--tokens", "6", "--theta-max", "0.5",
                 "--slm-drafter", drafter, "--ilm-drafter", drafter,
                 "--ilm-verifier", verifier, "--llm-verifier", verifier,
                 "--out", str(out), "--results-dir", str(tmp_path),
                 "--records", str(tmp_path / "records.npz"))
    assert asyncio.run(calibrate_cli.calibrate_family(args)) == 0
    doc = yaml.safe_load(out.read_text())
    assert {"t1", "t2", "t_ilm", "rule", "fits", "uncertainty", "gate_choice"} <= set(doc)
    assert all(0 <= doc[k] <= 1 for k in ("t1", "t2", "t_ilm"))
    assert doc["uncertainty"]["gate"] in calibrate_cli.GATES
    (json_path,) = tmp_path.glob("calibration-tiny-*.json")
    gates = json.loads(json_path.read_text())["results"]["gates"]
    assert set(gates) == set(calibrate_cli.GATES)
    for gate, by_pair in gates.items():
        result = by_pair["slm->llm"]
        assert result["prompts"] == 3 and 3 <= result["tokens"] <= 3 * 6
        assert 0 <= result["acceptance"] <= 1 and result["accepted"] <= result["tokens"]
    assert json_path.with_suffix(".png").is_file()
    saved = np.load(tmp_path / "records.npz")
    entropy = saved["entropy/slm->llm/u"]
    assert len(entropy) == gates["entropy"]["slm->llm"]["tokens"]
    assert np.all((entropy >= 0) & (entropy <= 1))
    perturbed = saved["perturbed/slm->llm/u"]  # steps of 1/K
    assert np.allclose(perturbed * 20, np.round(perturbed * 20), atol=1e-4)
