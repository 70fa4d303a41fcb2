"""One frozen config per `hilm dsi` mode, built from `key=value` overrides and validated.

Every field carries its meaning in `metadata["help"]`; `--help` prints them with their defaults.
Errors raise `ConfigError` with the fix in the message; the CLI turns it into exit code 2.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field

from hilm_vllm.lab.dsi.model import min_servers


class ConfigError(ValueError):
    """A bad override or an invalid combination; the message says what to change."""


def _f(default, meaning: str):
    return field(default=default, metadata={"help": meaning})


@dataclass(frozen=True)
class OfflineConfig:
    c: float = _f(0.1, "drafter latency, in target forwards (0 < c <= 1)")
    a: float = _f(0.9, "acceptance rate of each draft token (0 <= a <= 1)")
    k: int = _f(5, "lookahead: drafts per block (>= 1)")
    N: int = _f(7, "target servers for DSI (>= ceil(1 / (k*c)))")
    S: int = _f(1000, "tokens to generate per run (>= 1)")
    repeats: int = _f(10, "runs to average (>= 1)")
    seed: int = _f(42, "seed of the acceptance streams (SI and DSI share them)")


@dataclass(frozen=True)
class OnlineConfig:
    c: float = _f(0.1, "drafter latency, as a fraction of target_ms (0 < c <= 1)")
    a: float = _f(0.9, "acceptance rate of each draft token (0 <= a <= 1)")
    k: int = _f(5, "lookahead: drafts per block (>= 1)")
    N: int = _f(7, "target worker threads for DSI (>= ceil(1 / (k*c)))")
    S: int = _f(50, "tokens to generate per run (>= 1); wall time grows with S * target_ms")
    repeats: int = _f(2, "runs to average (>= 1)")
    seed: int = _f(42, "seed of the acceptance streams (SI and DSI share them)")
    target_ms: float = _f(20.0, "latency of one target forward, in milliseconds (> 0)")


@dataclass(frozen=True)
class HeatmapConfig:
    ndim: int = _f(20, "grid size: ndim values of c, ndim of a, lookaheads k = 1..ndim (>= 2)")
    c_min: float = _f(0.01, "smallest drafter latency on the grid (0 < c_min < 1)")
    a_min: float = _f(0.01, "smallest acceptance rate on the grid (0 <= a_min < a_max)")
    a_max: float = _f(0.99, "largest acceptance rate on the grid (a_max <= 1)")
    N: int = _f(7, "target servers: DSI only uses lookaheads k with N >= ceil(1 / (k*c))")
    S: int = _f(1000, "tokens to generate per run (>= 1)")
    repeats: int = _f(5, "runs to average per (c, a, k) (>= 1)")
    seed: int = _f(42, "seed of the acceptance streams (same for every cell and k)")
    num_cpus: int = _f(2, "CPUs of the local Ray instance (ignored with --address)")


@dataclass(frozen=True)
class EstimateConfig:
    recipe: str = _f("demo", "zoo recipe whose slm/ilm/llm are measured (built if missing)")
    slm: str = _f("", "SLM model directory (default: the zoo's)")
    ilm: str = _f("", "ILM model directory (default: the zoo's)")
    llm: str = _f("", "LLM model directory (default: the zoo's)")
    prompts: int = _f(8, "held-out prompts to measure on (>= 1)")
    tokens: int = _f(64, "greedy tokens each model generates per prompt (>= 2: TPOT needs two)")
    k_max: int = _f(10, "predictions take the best lookahead k in 1..k_max (>= 1)")
    N: int = _f(7, "target servers for the DSI prediction (>= 1)")
    S: int = _f(1000, "tokens per simulated run for the predictions (>= 1)")
    repeats: int = _f(10, "simulated runs per prediction (>= 1)")
    seed: int = _f(42, "seed of the simulated acceptance streams")


Config = OfflineConfig | OnlineConfig | HeatmapConfig | EstimateConfig


def describe(cls: type) -> str:
    """`key=default  meaning` lines for --help."""
    rows = [(f"{f.name}={f.default}", f.metadata["help"]) for f in dataclasses.fields(cls)]
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"  {key.ljust(width)}  {text}" for key, text in rows)


def _convert(key: str, raw: str, typ: type) -> object:
    if typ is str:
        return raw
    try:
        return typ(raw)
    except ValueError:
        example = "an integer, e.g. 5" if typ is int else "a number, e.g. 0.1"
        raise ConfigError(f"{key}={raw!r} is not {example}: write {key}=<{typ.__name__}>") from None


def parse_overrides(cls: type[Config], items: list[str]) -> Config:
    """`["c=0.05", "k=3"]` -> `cls(c=0.05, k=3)`, then validated."""
    types = typing.get_type_hints(cls)
    values: dict[str, object] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{item!r} is not key=value: write e.g. c=0.1 (keys: "
                              f"{', '.join(types)})")
        if key not in types:
            raise ConfigError(f"unknown key {key!r}: the keys are {', '.join(types)}")
        values[key] = _convert(key, raw.strip(), types[key])
    cfg = cls(**values)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Raise ConfigError listing every problem, each with its fix."""
    problems = [p for check in _CHECKS[type(cfg)] for p in check(cfg)]
    if problems:
        raise ConfigError("; ".join(problems))


def _at_least(cfg: Config, key: str, low: int) -> list[str]:
    value = getattr(cfg, key)
    return [] if value >= low else [f"{key}={value} must be >= {low}: set {key}={low} or more"]


def _counts(*keys: str):
    return lambda cfg: [p for key in keys for p in _at_least(cfg, key, 1)]


def _rates(cfg: OfflineConfig | OnlineConfig) -> list[str]:
    out = []
    if not 0 < cfg.c <= 1:
        out.append(f"c={cfg.c} must satisfy 0 < c <= 1 (the drafter's latency as a fraction of "
                   "the target's; a drafter slower than the target is no drafter): e.g. c=0.1")
    if not 0 <= cfg.a <= 1:
        out.append(f"a={cfg.a} must satisfy 0 <= a <= 1 (a probability): e.g. a=0.9")
    return out


def _servers(cfg: OfflineConfig | OnlineConfig) -> list[str]:
    if not (0 < cfg.c <= 1 and cfg.k >= 1):
        return []  # reported by the checks above; the rule needs both
    need = min_servers(cfg.c, cfg.k)
    if cfg.N >= need:
        return []
    return [f"N={cfg.N} target servers are too few for c={cfg.c}, k={cfg.k}: DSI needs "
            f"N >= ceil(1 / (k*c)) = {need}; set N={need} or more (or raise k or c)"]


def _target_ms(cfg: OnlineConfig) -> list[str]:
    if 0 < cfg.target_ms <= 10_000:  # beyond 10 s per forward a run takes hours: surely a typo
        return []
    return [f"target_ms={cfg.target_ms} must satisfy 0 < target_ms <= 10000: e.g. target_ms=20"]


def _grid(cfg: HeatmapConfig) -> list[str]:
    out = _at_least(cfg, "ndim", 2)
    if not 0 < cfg.c_min < 1:
        out.append(f"c_min={cfg.c_min} must satisfy 0 < c_min < 1: e.g. c_min=0.01")
    if not 0 <= cfg.a_min < cfg.a_max <= 1:
        out.append(f"a_min={cfg.a_min}, a_max={cfg.a_max} must satisfy "
                   "0 <= a_min < a_max <= 1: e.g. a_min=0.01 a_max=0.99")
    return out


def _recipe(cfg: EstimateConfig) -> list[str]:
    from hilm_vllm.zoo.recipes import recipe_names  # light: dataclasses only

    if cfg.recipe in recipe_names():
        return []
    return [f"recipe={cfg.recipe!r} is not a zoo recipe: choose one of {', '.join(recipe_names())}"]


_CHECKS: dict[type, tuple] = {
    OfflineConfig: (_rates, _counts("k", "S", "repeats", "N"), _servers),
    OnlineConfig: (_rates, _counts("k", "S", "repeats", "N"), _servers, _target_ms),
    HeatmapConfig: (_grid, _counts("S", "repeats", "N", "num_cpus")),
    EstimateConfig: (_counts("prompts", "k_max", "N", "S", "repeats"),
                     lambda cfg: _at_least(cfg, "tokens", 2), _recipe),
}
