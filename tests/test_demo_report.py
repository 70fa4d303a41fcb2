"""hilm_vllm/lab/bench/demo.py: metrics from synthetic requests, quality, table and JSON keys."""

import json
import math
import re

import numpy as np
import pytest

from hilm_vllm.lab.bench import demo

POLICY_KEYS = {"tokens", "wall_s", "tokens_per_s", "ttft_ms", "itl_ms_p50", "itl_ms_p99", "tr_llm",
               "tr_ilm", "skip_rate", "llm_forwards_per_token", "acceptance_ilm",
               "acceptance_llm", "uplink_bytes_per_token", "draft_bytes_per_token",
               "llm_cpu_ms_per_token", "efficiency", "quality"}
QUALITY_KEYS = {"exact_match_t0", "cosine_to_reference", "accuracy_ratio", "cosine_vs_llm"}


def hilm_usage(**kw):
    base = {"policy": "hilm", "rounds": 0, "skips": 0, "ilm_messages": 0, "llm_messages": 0,
            "ilm_drafted": 0, "ilm_accepted": 0, "llm_drafted": 0, "llm_accepted": 0,
            "llm_forwards": 0, "messages": {"slm": 0, "ilm": 0, "llm": 0},
            "uplink_bytes": {"slm": 0, "ilm": 0, "llm": 0},
            "model_ms": {"slm": 0.0, "ilm": 0.0, "llm": 0.0}, "network_ms": 0.0, "degraded": []}
    return base | kw


def record(i, start, chunks, end, tokens, usage=None, text="", error=None):
    return demo.RequestRecord(i, seed=i, start=start, end=end, chunk_times=chunks, text=text,
                              tokens=tokens, hilm=usage, error=error)


def synthetic_records():
    r0 = record(0, 0.0, [0.1, 0.2, 0.4], 0.5, 4, hilm_usage(
        skips=2, ilm_messages=1, llm_messages=1, ilm_drafted=2, ilm_accepted=1, llm_drafted=2,
        llm_accepted=2, ilm_drafts=1, llm_drafts=1, llm_forwards=1, uplink_bytes={"slm": 0, "ilm": 100, "llm": 60},
        model_ms={"slm": 50.0, "ilm": 100.0, "llm": 100.0}, network_ms=100.0))  # busy 350 / 500
    r1 = record(1, 0.0, [0.3, 0.4], 1.0, 4, hilm_usage(
        llm_messages=2, llm_drafted=4, llm_accepted=1, llm_forwards=2, llm_drafts=2,
        uplink_bytes={"llm": 80}, model_ms={"slm": 100.0, "llm": 200.0}, network_ms=200.0,
        degraded=["ilm unreachable"]))  # busy 500 / 1000
    r2 = record(2, 0.0, [], 2.0, 0, error="APIConnectionError: boom")
    return [r0, r1, r2]


def test_run_metrics_from_synthetic_requests():
    m = demo.run_metrics(synthetic_records(), wall_s=2.0)
    expected = {
        "requests": 3, "errors": 1, "degraded": 1, "tokens": 8, "wall_s": 2.0,
        "tokens_per_s": 4.0,                       # 8 tokens / 2 s
        "stream_tokens_per_s": 6.0,                # mean(4 / 0.5 s, 4 / 1.0 s)
        "ttft_ms": 200.0,                          # median(100, 300)
        "itl_ms_p50": 100.0, "itl_ms_p99": 198.0,  # gaps 100, 200 | 100 (linear percentile)
        "tpot_ms": (100.0 + 100.0 / 3) / 2,        # (0.4-0.1)/3 and (0.4-0.3)/3 s per token
        "tr_llm": 3 / 8, "tr_ilm": 1 / 8, "skip_rate": 2 / 8, "llm_forwards_per_token": 3 / 8,
        "acceptance_ilm": 1 / 2, "acceptance_llm": 3 / 6,
        "accept_len_ilm": 1 + 1 / 1, "accept_len_llm": 1 + 3 / 3,  # 1 + accepted / drafts
        "uplink_bytes_per_token": 240 / 8,         # router -> ilm + llm
        "draft_bytes_per_token": 0 / 8,
        "efficiency": (0.7 + 0.5) / 2,             # per request, then the mean
    }
    for key, value in expected.items():
        assert m[key] == pytest.approx(value), key


def test_run_metrics_without_usage_or_drafts_gives_none_not_zero():
    recs = [record(0, 0.0, [0.1], 0.2, 1)]  # a router that sent no usage.hilm
    m = demo.run_metrics(recs, wall_s=0.2)
    assert m["tokens"] == 1 and m["tokens_per_s"] == pytest.approx(5.0)
    for key in ("tr_llm", "skip_rate", "acceptance_ilm", "uplink_bytes_per_token", "efficiency",
                "itl_ms_p50", "tpot_ms"):
        assert m[key] is None, key
    m = demo.run_metrics([record(0, 0.0, [0.1], 0.2, 1, hilm_usage())], wall_s=0.2)
    assert m["tr_llm"] == 0 and m["acceptance_llm"] is None  # nothing drafted: no rate


# Embeddings of the fake embedder: c lies halfway between a and b.
VECTORS = {"ref0": [1, 0], "ref1": [0, 1], "a": [1, 0], "b": [0, 1], "c": [1, 1]}
S = 1 / math.sqrt(2)


def fake_embed(texts):
    return np.array([VECTORS[t] for t in texts], dtype=float)


def run(policy, temperature, texts):
    recs = [record(i, 0.0, [0.1, 0.2], 0.3, 2, hilm_usage(llm_messages=1), text=t or "",
                   error=None if t is not None else "failed") for i, t in enumerate(texts)]
    return demo.Run(policy, temperature, 1.0, recs)


def synthetic_runs():
    return [run("llm-only", 1.0, ["a", "b"]), run("hilm", 1.0, ["b", None]),
            run("llm-only", 0.0, ["a", "b"]), run("hilm", 0.0, ["a", "c"])]


def test_quality_metrics_against_reference_and_llm_only():
    scores = demo.quality_metrics(synthetic_runs(), ["ref0", "ref1"], fake_embed)
    assert scores[("llm-only", 0.0)] == pytest.approx(
        {"cosine_to_reference": 1.0, "accuracy_ratio": 1.0, "cosine_vs_llm": 1.0,
         "exact_match": 1.0})
    assert scores[("hilm", 0.0)] == pytest.approx(
        {"cosine_to_reference": (1 + S) / 2, "accuracy_ratio": (1 + S) / 2,
         "cosine_vs_llm": (1 + S) / 2, "exact_match": 0.5})
    # The failed prompt is left out: one prompt, b against ref0 and against llm-only's a.
    assert scores[("hilm", 1.0)] == pytest.approx(
        {"cosine_to_reference": 0.0, "accuracy_ratio": 0.0, "cosine_vs_llm": 0.0,
         "exact_match": 0.0})


def test_policies_take_t1_metrics_and_exact_match_from_t0():
    scores = demo.quality_metrics(synthetic_runs(), ["ref0", "ref1"], fake_embed)
    policies = demo.build_policies(synthetic_runs(), scores)
    hilm = policies["hilm"]
    assert POLICY_KEYS <= hilm.keys() and set(hilm["quality"]) == QUALITY_KEYS
    assert hilm["temperature"] == 1.0 and hilm["errors"] == 1 and hilm["tokens"] == 2
    assert hilm["quality"] == pytest.approx({"exact_match_t0": 0.5, "cosine_to_reference": 0.0,
                                             "accuracy_ratio": 0.0, "cosine_vs_llm": 0.0})
    assert set(hilm["by_temperature"]) == {"1", "0"}
    assert hilm["by_temperature"]["0"]["quality"]["exact_match"] == 0.5
    assert hilm["by_temperature"]["0"]["errors"] == 0


def test_policies_without_t0_or_quality_say_none():
    runs = [run("llm-only", 1.0, ["a", "b"])]
    entry = demo.build_policies(runs, None)["llm-only"]
    assert entry["quality"] == dict.fromkeys(QUALITY_KEYS)


def test_uplink_counts_only_the_verifiers_and_drafts_are_the_drafters_downlink():
    u = hilm_usage(uplink_bytes={"slm": 500, "ilm": 100, "llm": 60},
                   downlink_bytes={"slm": 800, "ilm": 30, "llm": 20})
    m = demo.run_metrics([record(0, 0.0, [0.1], 0.5, 4, u)], wall_s=0.5)
    assert m["uplink_bytes_per_token"] == 160 / 4 and m["draft_bytes_per_token"] == 800 / 4


def test_llm_cpu_per_token_and_its_ratio_to_llm_only():
    runs = synthetic_runs()
    for r, cpu_s in zip(runs, (0.004, 0.001, 0.004, None)):  # llm-only, hilm at T=1; T=0 ...
        r.llm_cpu_s = cpu_s
    policies = demo.build_policies(runs, None)
    assert policies["llm-only"]["llm_cpu_ms_per_token"] == pytest.approx(4 / 4)  # 4 tokens
    assert policies["hilm"]["llm_cpu_ms_per_token"] == pytest.approx(1 / 2)  # 2 tokens (1 ok)
    assert policies["hilm"]["llm_cpu_ratio"] == pytest.approx(0.5)
    assert policies["llm-only"]["llm_cpu_ratio"] == 1.0
    assert policies["hilm"]["by_temperature"]["0"]["llm_cpu_ms_per_token"] is None
    assert policies["hilm"]["by_temperature"]["0"]["llm_cpu_ratio"] is None
    table = demo.render_table(policies, 1.0).splitlines()
    headers = [c.strip() for c in table[0].split("|")[2:-1]]
    row = dict(zip(headers, [c.strip() for c in table[3].split("|")[2:-1]]))
    assert row["LLM CPU ms/tok"] == "0.50" and row["x llm-only"] == "0.50"


def test_table_has_a_row_per_policy_and_dashes_for_missing_values():
    scores = demo.quality_metrics(synthetic_runs(), ["ref0", "ref1"], fake_embed)
    policies = demo.build_policies(synthetic_runs(), scores)
    table = demo.render_table(policies, 0.0).splitlines()
    assert table[0].startswith("| policy") and "tok/s" in table[0] and "exact" in table[0]
    assert set(table[1]) <= {"|", "-", " "}
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in table[2:]}
    assert list(rows) == ["llm-only", "hilm"]
    headers = [c.strip() for c in table[0].split("|")[2:-1]]
    hilm = dict(zip(headers, rows["hilm"]))
    assert hilm["exact"] == "0.50" and hilm["tok/s"] == "4.0" and hilm["TR llm"] == "0.500"
    assert hilm["acc ilm"] == "-"  # nothing drafted to the ILM
    assert len({len(line) for line in table}) == 1  # aligned columns


def test_json_document_has_the_exact_keys(tmp_path, monkeypatch):
    from hilm_vllm.lab import benchjson

    monkeypatch.setattr(benchjson, "machine", lambda: {"cpu_count": 2})  # no torch import
    scores = demo.quality_metrics(synthetic_runs(), ["ref0", "ref1"], fake_embed)
    policies = demo.build_policies(synthetic_runs(), scores)
    path = benchjson.write_result("demo", {"prompts": 2}, {"requests": []}, tmp_path,
                                  top={"policies": policies})
    assert re.fullmatch(r"demo-\d{8}T\d{6}Z\.json", path.name)
    doc = json.loads(path.read_text())
    assert {"config", "git_commit", "machine", "policies"} <= doc.keys()
    for name, entry in doc["policies"].items():
        assert POLICY_KEYS <= entry.keys(), name
        assert set(entry["quality"]) == QUALITY_KEYS, name
        for by_t in entry["by_temperature"].values():
            assert POLICY_KEYS <= by_t.keys()


def test_defaults_run_every_policy_at_both_temperatures_plus_the_reseed():
    args = demo.parse_args([])
    order = demo.run_order(args)
    assert len(order) == 16 and order[0] == ("llm-only", 1.0)
    assert [p for p, t in order if t == 0.0] == [*demo.POLICIES, demo.RESEED]
    args = demo.parse_args(["--policies", "hilm", "--no-reseed", "--temperatures", "0"])
    assert demo.run_order(args) == [("llm-only", 0.0), ("hilm", 0.0)]  # baseline always runs
    with pytest.raises(SystemExit):
        demo.parse_args(["--policies", "nope"])


# ---- quality through bench/scoring.py -------------------------------------------------------------

def _scores(nll, cos, skipped=None, t0=None):
    from hilm_vllm.lab.bench.scoring import RunScores, Scored

    skipped = skipped or [None] * len(nll)
    return RunScores([Scored(nll=a, n=10, skipped_p=s[0] if s else [], skipped_q=s[1] if s else [],
                             skipped=len(s[0]) if s else 0, source="router")
                      for a, s in zip(nll, skipped)], cosine=cos, outputs_t0=t0)


HEADLINE_KEYS = {"ppl_llm", "ppl_ratio", "tsr", "exact_match_t0", "cosine_to_reference",
                 "accuracy_ratio", "ci95", "noise_floor", "cosine_vs_llm", "tsr_coverage"}


def test_quality_dicts_score_each_run_against_llm_only_and_take_exact_match_from_t0():
    scores = {("llm-only", 1.0): _scores([10.0, 20.0], [0.5, 0.5]),
              ("hilm", 1.0): _scores([20.0, 20.0], [0.5, 0.25],
                                     skipped=[([0.2], [0.4]), ([0.9, 0.5], [0.3, 0.5])]),
              (demo.RESEED, 1.0): _scores([11.0, 19.0], [0.5, 0.5]),
              ("llm-only", 0.0): _scores([5.0, 5.0], [0.5, 0.5], t0=["a", "b"]),
              ("hilm", 0.0): _scores([5.0, 5.0], [0.5, 0.5], t0=["a", "c"]),
              (demo.RESEED, 0.0): _scores([5.0, 5.0], [0.5, 0.5], t0=["a", "b"])}
    per_run = {k: {"cosine_vs_llm": 0.9, "exact_match": None} for k in scores}
    runs, headline = demo.quality_dicts(scores, per_run)
    hilm = headline["hilm"]
    assert HEADLINE_KEYS <= hilm.keys()
    assert hilm["ppl_ratio"] == pytest.approx(math.exp(40 / 20) / math.exp(30 / 20))
    assert hilm["tsr"] == pytest.approx((0.5 + 1 + 1) / 3)  # min(1, p/q) pooled over SKIPs
    assert hilm["exact_match_t0"] == 0.5 and hilm["cosine_vs_llm"] == 0.9
    assert hilm["noise_floor"]["ppl_ratio"]["value"] == pytest.approx(
        math.exp(30 / 20) / math.exp(30 / 20))
    assert headline["llm-only"]["ppl_ratio"] == pytest.approx(1.0)
    assert runs[("hilm", 0.0)]["exact_match_t0"] == 0.5
    assert runs[("hilm", 1.0)]["exact_match_t0"] is None  # T = 1 runs have no T = 0 outputs
    assert "cosine_vs_llm" in runs[("hilm", 1.0)]  # the old keys stay


def test_policies_with_headline_quality_keep_the_old_keys_and_add_the_issue_keys():
    scores = demo.quality_metrics(synthetic_runs(), ["ref0", "ref1"], fake_embed)
    headline = {"hilm": {"ppl_llm": 3.0, "ppl_ratio": 1.1, "tsr": 0.9}}
    policies = demo.build_policies(synthetic_runs(), scores, headline)
    q = policies["hilm"]["quality"]
    assert QUALITY_KEYS <= q.keys() and q["ppl_ratio"] == 1.1 and q["tsr"] == 0.9
    table = demo.render_table(policies, 1.0)
    assert "ppl ratio" in table and "TSR" in table


def test_operating_point_report_places_hilm_beside_the_nearest_sweep_points(tmp_path):
    entry = {"temperature": 1.0, "tokens_per_s": 40.0, "tr_llm": 0.2, "tr_ilm": 0.1,
             "skip_rate": 0.5, "quality": {"ppl_ratio": 1.05, "tsr": 0.9}}
    policies = {"hilm": entry, "hlm": {"tokens_per_s": 10.0, "tr_llm": 1.0}}
    args = demo.parse_args(["--out-dir", str(tmp_path), "--zoo", "demo"])
    text = demo.operating_point_report(policies, args)
    assert "4.00x hlm" in text and "no sweep of the demo family" in text
    points = [{"policy": p, "label": f"{p}@{tr}", "tr_llm": tr, "calibrated": False,
               "quality": {"ppl_ratio": 1 + tr}} for p in ("uhlm", "rand") for tr in (0.1, 0.6)]
    (tmp_path / "sweep-20990101T000000Z.json").write_text(json.dumps(
        {"config": {"zoo": "demo", "num_prompts": 4, "max_tokens": 8}, "points": points}))
    text = demo.operating_point_report(policies, args)
    assert "uhlm@0.1" in text and "rand@0.1" in text and "@0.6" not in text
