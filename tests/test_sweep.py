"""bench/sweep.py without engines: the grid from the calibration YAML, the points' keys and
`skip_rate`, the comparisons at equal TR and equal ppl_ratio, the JSON and PNG, `hilm bench`."""

from __future__ import annotations

import json
import re

import pytest

from hilm_vllm.lab.bench import sweep, sweep_points
from hilm_vllm.lab.bench.demo import RequestRecord, Run

BLOCKS = [{"lo": 0.0, "hi": 0.0, "level": 0.05, "tokens": 20},  # 20% of tokens at u = 0
          {"lo": 0.05, "hi": 0.45, "level": 0.2, "tokens": 40},
          {"lo": 0.5, "hi": 1.0, "level": 0.6, "tokens": 40}]
YAML = {"t1": 0.125, "t2": 0.325, "t_ilm": 0.4,
        "uncertainty": {"gate": "perturbed", "num_samples": 20},
        "fits": {"slm->llm": {"monotone": BLOCKS}}}


def test_gate_quantiles_from_the_monotone_blocks():
    assert sweep.gate_quantile(BLOCKS, 0.1) == 0.0  # inside the u = 0 block
    assert sweep.gate_quantile(BLOCKS, 0.2) == 0.0
    assert sweep.gate_quantile(BLOCKS, 0.4) == pytest.approx(0.05 + 0.5 * 0.4)  # halfway
    assert sweep.gate_quantile(BLOCKS, 1.0) == 1.0
    with pytest.raises(ValueError):
        sweep.gate_quantile([{"lo": 0, "hi": 1, "tokens": 0}], 0.5)


def test_thresholds_on_a_stepped_gate_sit_halfway_between_steps():
    assert sweep.on_steps(0.0, 20) == pytest.approx(0.025)  # keeps u = 0, not u = 0.05
    assert sweep.on_steps(0.05, 20) == pytest.approx(0.075)
    assert sweep.on_steps(0.06, 20) == pytest.approx(0.075)
    assert sweep.on_steps(0.97, 20) == pytest.approx(0.975)
    assert sweep.on_steps(1.0, 20) == 1.0


def test_plan_points_quantile_grid_calibrated_points_and_dedup():
    args = sweep.parse_args(["--shares", "0.1,0.2,0.6"])
    specs, why = sweep.plan_points(args, YAML)
    assert "quantiles of the perturbed gate" in why
    labels = [s.label for s in specs]
    assert labels[:7] == ["llm-only", "llm-only-reseed", "hlm", "spec", "cascade",
                          "uhlm@calibrated", "hilm@calibrated"]
    by = {s.label: s for s in specs}
    assert by["llm-only-reseed"].policy == "llm-only" and by["llm-only-reseed"].seed_offset > 0
    assert by["hilm@calibrated"].thresholds == {"t1": 0.125, "t2": 0.325, "t_ilm": 0.4}
    assert by["hilm@calibrated"].calibrated and by["hilm@calibrated"].body() == {
        "thresholds": {"t1": 0.125, "t2": 0.325, "t_ilm": 0.4}}
    # shares 0.1 and 0.2 both give u <= 0 (threshold 0.025) for uhlm: it runs once
    assert "uhlm@0.1" in by and "uhlm@0.2" not in by
    assert by["uhlm@0.1"].thresholds["t2"] == pytest.approx(0.025)
    # hilm: t1 = Q(s), t2 = Q(s + band (1 - s)); t_ilm from the YAML
    h = by["hilm@0.6"].thresholds
    assert h["t1"] == pytest.approx(sweep.on_steps(sweep.gate_quantile(BLOCKS, 0.6), 20))
    assert h["t2"] == pytest.approx(sweep.on_steps(sweep.gate_quantile(BLOCKS, 0.8), 20))
    assert h["t_ilm"] == 0.4
    assert by["rand@0.2"].skip_rate == 0.2 and by["rand@0.2"].body() == {"skip_rate": 0.2}
    assert by["rand@0.2"].thresholds is None


def test_plan_points_fixed_grid_and_subsets():
    args = sweep.parse_args(["--grid", "fixed", "--shares", "0.3", "--policies", "uhlm",
                             "--no-reseed", "--no-calibrated"])
    specs, why = sweep.plan_points(args, YAML)
    assert why.startswith("fixed grid")
    assert [s.label for s in specs] == ["llm-only", "uhlm@0.3"]  # llm-only always runs
    assert specs[1].thresholds["t2"] == 0.3
    specs, why = sweep.plan_points(sweep.parse_args([]), {"t1": 6.5, "t2": 4.3, "t_ilm": 7.6})
    assert "no monotone model" in why  # an old YAML: fixed grid, calibrated points kept
    assert any(s.label == "hilm@calibrated" for s in specs)
    with pytest.raises(SystemExit):
        sweep.parse_args(["--shares", "1.5"])


def test_run_plan_adds_t0_runs_for_the_lossless_points():
    args = sweep.parse_args(["--t0", "lossless", "--shares", "0.5"])
    specs, _ = sweep.plan_points(args, YAML)
    order = sweep.run_plan(specs, args)
    t0 = [s.label for s, t in order if t == 0.0]
    assert t0 == ["llm-only", "llm-only-reseed", "hlm", "spec", "cascade"]
    assert all(t == 1.0 for _, t in order[:len(specs)])


def metrics(**kw):
    base = {"tokens_per_s": 50.0, "tr_llm": 0.3, "tr_ilm": 0.1, "skip_rate": 0.4,
            "errors": 0, "tokens": 64}
    return base | kw


def test_a_point_has_the_issue_keys_and_skip_rate_is_target_for_rand_measured_for_uhlm():
    q = {"ppl_ratio": 1.1}
    rand = sweep.assemble_point(sweep.PointSpec("rand@0.5", "rand", skip_rate=0.5, share=0.5),
                                metrics(skip_rate=0.37), q)
    assert tuple(rand) == sweep.POINT_KEYS
    assert rand["skip_rate"] == 0.5 and rand["skip_rate_measured"] == 0.37
    assert rand["thresholds"] is None and rand["quality"] is q
    th = {"t1": 0.1, "t2": 0.1, "t_ilm": 0.4}
    uhlm = sweep.assemble_point(sweep.PointSpec("uhlm@0.5", "uhlm", th, share=0.5),
                                metrics(skip_rate=0.42), q)
    assert uhlm["skip_rate"] == 0.42 == uhlm["skip_rate_measured"] and uhlm["thresholds"] == th
    spec = sweep.assemble_point(sweep.PointSpec("spec", "spec"), metrics(skip_rate=0.0), q)
    assert spec["skip_rate"] is None and spec["skip_rate_measured"] == 0.0
    assert spec["tokens_per_s"] == 50.0 and spec["tr_llm"] == 0.3 and spec["tr_ilm"] == 0.1


def test_interpolation():
    assert sweep.interpolate([0.0, 1.0], [1.0, 3.0], 0.25) == pytest.approx(1.5)
    assert sweep.interpolate([1.0, 0.0], [3.0, 1.0], 1.0) == 3.0  # unsorted input
    assert sweep.interpolate([0.0, 1.0], [1.0, 3.0], 1.5) is None  # no extrapolation
    assert sweep.interpolate([0.0, None], [1.0, 2.0], 0.0) == 1.0
    assert sweep.interpolate([], [], 0.0) is None


def point(policy, label, tr, ppl, tps=10.0, tsr=None):
    return {"policy": policy, "label": label, "tr_llm": tr, "tr_ilm": 0.0, "tokens_per_s": tps,
            "calibrated": False, "quality": {"ppl_ratio": ppl, "tsr": tsr}}


def test_comparisons_at_equal_tr_and_at_equal_ppl_ratio():
    points = [point("rand", "rand@a", 0.2, 1.4, tsr=0.5), point("rand", "rand@b", 0.6, 1.0,
                                                                tsr=0.7),
              point("uhlm", "uhlm@a", 0.4, 1.1, tsr=0.9), point("uhlm", "uhlm@b", 0.8, 1.0),
              point("hilm", "hilm@a", 0.3, 1.05), point("hilm", "hilm@b", 0.1, 1.6)]
    c = sweep.comparisons(points)
    u = next(x for x in c["vs_rand_at_equal_tr"] if x["label"] == "uhlm@a")
    assert u["rand_ppl_ratio"] == pytest.approx(1.2) and u["rand_tsr"] == pytest.approx(0.6)
    assert u["ppl_ratio"] == 1.1
    far = next(x for x in c["vs_rand_at_equal_tr"] if x["label"] == "uhlm@b")
    assert far["rand_ppl_ratio"] is None  # rand's curve stops at tr 0.6
    h = {x["label"]: x for x in c["hilm_vs_uhlm_at_equal_ppl_ratio"]}
    assert h["hilm@a"]["uhlm_tr_llm"] == pytest.approx(0.6)  # uhlm at ppl_ratio 1.05
    assert h["hilm@a"]["tr_llm"] == 0.3
    assert h["hilm@b"]["uhlm_tr_llm"] is None


def test_nearest_points_and_latest_sweep(tmp_path):
    points = [point("uhlm", "u1", 0.1, 1.2), point("uhlm", "u2", 0.5, 1.0),
              point("rand", "r1", 0.45, 1.1), dict(point("hilm", "hc", 0.2, 1.1),
                                                   calibrated=True)]
    near = [p["label"] for p in sweep_points.nearest_points(points, 0.4)]
    assert near == ["hc", "u2", "r1"]
    assert sweep_points.latest_sweep(tmp_path) is None
    for stamp, zoo in (("20990101T000000Z", "demo"), ("20990102T000000Z", "tiny")):
        (tmp_path / f"sweep-{stamp}.json").write_text(json.dumps({"config": {"zoo": zoo}}))
    assert sweep_points.latest_sweep(tmp_path).name == "sweep-20990102T000000Z.json"
    assert sweep_points.latest_sweep(tmp_path, "demo").name == "sweep-20990101T000000Z.json"


def _run(label, temperature, texts, skipped=()):
    recs = [RequestRecord(i, i, 0.0, 0.5, [0.1, 0.2], t, 4, {
        "skips": len(skipped), "llm_messages": 1, "skipped_at": list(skipped)})
        for i, t in enumerate(texts)]
    return Run(label, temperature, 1.0, recs)


def test_points_json_and_png_from_synthetic_runs(tmp_path, monkeypatch):
    """build_points + comparisons + write_result + plot, with hand-made scores (no models)."""
    from hilm_vllm.lab.bench.scoring import RunScores, Scored
    from hilm_vllm.lab import benchjson

    monkeypatch.setattr(benchjson, "machine", lambda: {"cpu_count": 2})
    args = sweep.parse_args(["--shares", "0.5"])
    specs, _ = sweep.plan_points(args, YAML)
    specs = [s for s in specs if s.label in ("llm-only", "llm-only-reseed", "uhlm@0.5",
                                             "rand@0.5", "hilm@calibrated")]
    runs = [sweep.PointRun(s, 1.0, _run(s.label, 1.0, ["a", "b"],
                                        skipped=(0,) if s.policy != "llm-only" else ()))
            for s in specs]
    nll = {"llm-only": 10.0, "llm-only-reseed": 11.0, "uhlm@0.5": 12.0, "rand@0.5": 14.0,
           "hilm@calibrated": 11.5}
    scores = {(s.label, 1.0): RunScores(
        [Scored(nll=nll[s.label], n=10, skipped_p=[0.5] if s.policy != "llm-only" else [],
                skipped_q=[0.5] if s.policy != "llm-only" else [],
                skipped=int(s.policy != "llm-only"), source="router")] * 2, [0.5, 0.4])
        for s in specs}
    points = sweep.build_points(runs, scores, 1.0)
    assert [p["label"] for p in points] == [s.label for s in specs]
    for p in points:
        assert tuple(p) == sweep.POINT_KEYS
        for key in ("ppl_llm", "ppl_ratio", "tsr", "exact_match_t0", "cosine_to_reference",
                    "accuracy_ratio", "ci95", "noise_floor"):
            assert key in p["quality"], (p["label"], key)
    by = {p["label"]: p for p in points}
    assert by["llm-only"]["quality"]["ppl_ratio"] == pytest.approx(1.0)
    assert by["rand@0.5"]["skip_rate"] == 0.5 and by["rand@0.5"]["quality"]["tsr"] == 1.0
    assert by["uhlm@0.5"]["skip_rate"] == pytest.approx(0.25)  # 1 skip / 4 tokens, measured
    path = benchjson.write_result("sweep", {"zoo": "demo"}, {"requests": []}, tmp_path,
                                  top={"points": points, "comparisons": sweep.comparisons(points)})
    assert re.fullmatch(r"sweep-\d{8}T\d{6}Z\.json", path.name)
    doc = json.loads(path.read_text())
    assert {"config", "git_commit", "machine", "points", "comparisons"} <= doc.keys()
    png = path.with_suffix(".png")
    sweep.plot(png, doc["points"], "test")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_hilm_bench_dispatches_to_the_named_script(monkeypatch):
    from hilm_vllm import cli

    seen = {}
    mod = cli.load_bench("sweep")
    assert mod is sweep
    monkeypatch.setattr(mod, "main", lambda argv: seen.setdefault("argv", argv) and 0)
    assert cli.main(["bench", "sweep", "--prompts", "2", "--zoo", "tiny"]) == 0
    assert seen["argv"] == ["--prompts", "2", "--zoo", "tiny"]
    with pytest.raises(SystemExit):
        cli.main(["bench", "no-such-benchmark"])
