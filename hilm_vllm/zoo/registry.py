"""Where the built families are, and `--model zoo:<family>/<tier>`: what the serving side needs
of the zoo (the router, `hilm-serve`, `hilm up`). Imports no builder: building is `ensure_zoo`'s
(the package's __init__)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from hilm_vllm.tiers import MODEL_TIERS
from hilm_vllm.zoo.recipes import RandomRecipe, Recipe, get_recipe

ZOO_PREFIX = "zoo:"  # --model zoo:demo/llm names a model of the locally built demo family


@dataclass(frozen=True)
class Zoo:
    root: Path

    @property
    def slm(self) -> Path:
        return self.root / "slm"

    @property
    def ilm(self) -> Path:
        return self.root / "ilm"

    @property
    def llm(self) -> Path:
        return self.root / "llm"

    def model(self, tier: str) -> Path:
        return self.root / tier

    @cached_property
    def manifest(self) -> dict:
        return json.loads((self.root / "manifest.json").read_text())

    def heldout_prompts(self, n: int | None = None) -> list[dict]:
        rows = [json.loads(line) for line in (self.root / "heldout.jsonl").read_text().splitlines()]
        return rows[:n] if n is not None else rows


def cache_root() -> Path:
    """`HILM_ZOO_DIR`, else the user's cache directory."""
    if env := os.environ.get("HILM_ZOO_DIR"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "hilm-vllm" / "zoo"


def zoo_dir(recipe: Recipe | RandomRecipe) -> Path:
    return cache_root() / recipe.key()


def find_zoo(recipe: str | Recipe | RandomRecipe = "demo", seed: int = 0) -> Zoo | None:
    r = get_recipe(recipe) if isinstance(recipe, str) else recipe
    root = zoo_dir(r.with_seed(seed))
    return Zoo(root) if (root / "manifest.json").is_file() else None


def resolve_model(spec: str) -> str:
    """`zoo:<recipe>/<tier>` -> the built model's directory; anything else unchanged."""
    if not spec.startswith(ZOO_PREFIX):
        return spec
    recipe, _, tier = spec[len(ZOO_PREFIX):].partition("/")
    if tier not in [t.value for t in MODEL_TIERS]:
        raise SystemExit(f"error: --model {spec}: expected zoo:<recipe>/<slm|ilm|llm>")
    try:
        zoo = find_zoo(recipe)
    except ValueError as e:  # an unknown recipe
        raise SystemExit(f"error: --model {spec}: {e}") from None
    if zoo is None:
        raise SystemExit(f"error: --model {spec}: the {recipe!r} zoo is not built; run "
                         f"`hilm zoo build --recipe {recipe}` first")
    return str(zoo.model(tier))
