"""The project's demo model family (SLM < ILM < LLM sharing one tokenizer), built locally.

    zoo = ensure_zoo("demo")          # builds once, then cached
    zoo.slm, zoo.ilm, zoo.llm         # Hugging Face model directories
    zoo.manifest["acceptance"]        # measured at build time
    zoo.heldout_prompts()             # [{"file", "prompt", "reference"}]

`ensure_zoo("vocab32k")` / `ensure_zoo("vocab128k")` give random-weight families with hub-sized
vocabularies in the same layout, for plumbing and cost (random_family.py).

What serving needs (finding a built family, `--model zoo:<family>/<tier>`) is in registry.py,
which imports no builder; the builders load only when `ensure_zoo` builds.
"""

from __future__ import annotations

from hilm_vllm.zoo.recipes import (
    RANDOM_RECIPES,
    RECIPES,
    RandomRecipe,
    Recipe,
    get_recipe,
    recipe_names,
)
from hilm_vllm.zoo.registry import ZOO_PREFIX, Zoo, cache_root, find_zoo, resolve_model, zoo_dir

__all__ = ["RANDOM_RECIPES", "RECIPES", "RandomRecipe", "Recipe", "ZOO_PREFIX", "Zoo",
           "cache_root", "ensure_zoo", "find_zoo", "get_recipe", "recipe_names", "resolve_model",
           "zoo_dir"]


def ensure_zoo(recipe: str | Recipe | RandomRecipe = "demo", seed: int = 0, device: str = "cpu",
               progress: bool = True, force: bool = False) -> Zoo:
    """Return the cached zoo for this recipe and seed, building it first if needed (a random
    family is built on the CPU whatever `device` says: nothing is trained).

    A file lock makes concurrent callers (parallel tests, two terminals) build it once."""
    from filelock import FileLock

    r = (get_recipe(recipe) if isinstance(recipe, str) else recipe).with_seed(seed)
    root = zoo_dir(r)
    root.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root) + ".lock"):
        if force or not (root / "manifest.json").is_file():
            # the builders load torch and transformers: imported only to build
            if isinstance(r, RandomRecipe):
                # loads torch / vLLM: only when it runs
                from hilm_vllm.zoo.random_family import build_random

                build_random(r, root, progress=progress)
            else:
                from hilm_vllm.zoo.build import build  # loads torch / vLLM: only when it runs

                build(r, root, device=device, progress=progress)
    return Zoo(root)
