"""The soak's memory timeline and its plot, without engines: RssSampler over a stand-in stack
(only its rss_by_process is used), the verdict's growth figures and the PNG."""

from __future__ import annotations

import itertools
import time

from hilm_vllm.lab.bench import soak as soak_bench
from hilm_vllm.lab.soak import harness as soak_harness
from hilm_vllm.lab.soak.harness import RssSampler, summarize


class GrowingStack:
    """rss_by_process of two tiers: the ILM's engine core grows 10 MB per sample."""

    def __init__(self):
        self.n = itertools.count()

    def rss_by_process(self):
        i = next(self.n)
        return {"ilm": {"api": 500.0, "EngineCore": 1000.0 + 10 * i},
                "router": {"api": 600.0}}


def test_the_sampler_records_each_process_along_the_run():
    with RssSampler(GrowingStack(), every_s=0.02) as sampler:
        time.sleep(0.15)
    tl = sampler.series()
    n = len(tl["t_s"])
    assert n >= 3 and tl["t_s"] == sorted(tl["t_s"])
    assert tl["ilm"] == [1500.0 + 10 * i for i in range(n)]
    assert tl["by_process"]["ilm"]["EngineCore"][-1] == 1000.0 + 10 * (n - 1)
    assert tl["router"] == [600.0] * n


def test_the_plot_shows_each_tier(tmp_path):
    samples = {"requests": 10, "failures": 0, "ttft_ms": [1.0], "itl_ms": [1.0]}
    rss = {"ilm": {"start": 1400.0, "after_warmup": 1500.0, "end": 1600.0},
           "router": {"start": 600.0, "after_warmup": 600.0, "end": 601.0}}
    results = summarize(4, 60.0, samples, rss, {"ilm": 0})
    assert results["verdict"]["rss_growth_pct_after_warmup"] == {"ilm": 6.67, "router": 0.17}
    assert not results["verdict"]["pass"]  # the ILM grew more than 5% after the warm-up
    with RssSampler(GrowingStack(), every_s=0.02) as sampler:
        time.sleep(0.1)
    results["rss_timeline"] = sampler.series()
    png = tmp_path / "soak.png"
    soak_bench.plot(png, results, warmup_s=0.05)
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_the_verdict_fits_each_tiers_memory_slope_over_the_last_half_hour():
    samples = {"requests": 10, "failures": 0, "ttft_ms": [1.0], "itl_ms": [1.0]}
    rss = {"ilm": {"start": 1000.0, "after_warmup": 1100.0, "end": 1130.0},
           "llm": {"start": 1000.0, "after_warmup": 1100.0, "end": 1101.0}}
    t = [60.0 * i for i in range(61)]  # one hour, a sample a minute
    # The ILM grows 10 MB/min for 20 min, then 1.5 MB/min; the LLM levels off at 1100 MB.
    ilm = [1000.0 + (10 * m if m <= 20 else 200 + 1.5 * (m - 20)) for m in range(61)]
    llm = [min(1100.0, 1000.0 + 20 * m) for m in range(61)]
    results = summarize(4, 3600.0, samples, rss, {"ilm": 0, "llm": 0})
    results["rss_timeline"] = {"t_s": t, "ilm": ilm, "llm": llm, "by_process": {}}
    assert results["verdict"]["pass"]  # growth after the warm-up < 5% for both
    soak_harness.judge_slopes(results, 3600.0)
    v = results["verdict"]
    assert v["rss_slope_window_s"] == 1800.0
    assert v["rss_slope_mb_per_min"] == {"ilm": 1.5, "llm": 0.0}
    assert v["rss_levelled"] is False and not v["pass"]  # 1.5 MB/min is over the 1 MB/min limit
    # A 10-minute run reports its slope (over its last 5 minutes) without judging it.
    short = summarize(4, 600.0, samples, rss, {"ilm": 0, "llm": 0})
    short["rss_timeline"] = {"t_s": t[:11], "ilm": ilm[:11], "llm": llm[:11], "by_process": {}}
    soak_harness.judge_slopes(short, 600.0)
    assert short["verdict"]["rss_slope_mb_per_min"]["ilm"] == 10.0
    assert short["verdict"]["rss_levelled"] is None and short["verdict"]["pass"]
