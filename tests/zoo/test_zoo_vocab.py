"""The random-weight large-vocabulary families (hilm_vllm/zoo/random_family.py).

vocab32k is built once per machine (the `vocab32k_zoo` fixture, ~15 s) and checked end to end:
layout, vocabulary sizes, tokenizer, shared weights, vLLM. vocab128k is never built here (400 MB,
~35 s): its recipe, config and tokenizer-fill logic are checked without weights, and the fill on
a small vocabulary that BPE cannot reach."""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json

import pytest
import torch
import yaml

from tests.conftest import vllm_llm
from tests.zoo.helpers import greedy_transformers

TIERS = ("slm", "ilm", "llm")
TEXT = ('def greet(name: str) -> str:\n    """Say hello — in Unicode: café, 日本."""\n'
        '    return f"hello, {name}!"\n\n\nclass Foo(Bar):\n\tpass\n')


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---- vocab32k, built ------------------------------------------------------------------------

def test_vocab32k_layout_and_manifest(vocab32k_zoo):
    m = vocab32k_zoo.manifest
    assert m["random"] is True and "random" in m["weights"] and "not for quality" in m["weights"]
    assert "gates" not in m
    assert m["tokenizer"] == m["tokenizer"] | {"vocab_size": 32_000, "bpe_tokens": 32_000,
                                               "fill_tokens": 0}  # BPE reaches 32k by itself
    assert set(m["models"]) == set(TIERS)
    assert [m["models"][t]["layers"] for t in TIERS] == [1, 2, 3]
    assert m["models"]["slm"]["parameters"] < m["models"]["ilm"]["parameters"] < \
        m["models"]["llm"]["parameters"]
    # peaky, correlated random models (the recipe's point): a few nats, acceptance well above 0
    assert all(1.5 < m["entropy"][t] < 6 for t in TIERS), m["entropy"]
    assert all(0.3 < a < 0.95 for a in m["acceptance"].values()), m["acceptance"]
    rows = vocab32k_zoo.heldout_prompts()
    assert len(rows) == m["heldout_prompts"] >= 16
    assert all(set(r) == {"file", "prompt", "reference"} and r["prompt"] and r["reference"]
               for r in rows)
    for tier in TIERS:
        d = vocab32k_zoo.model(tier)
        for name in ("config.json", "model.safetensors", "tokenizer.json",
                     "tokenizer_config.json", "generation_config.json"):
            assert (d / name).is_file(), (tier, name)
        config = json.loads((d / "config.json").read_text())
        assert config["vocab_size"] == 32_000 and config["head_dim"] == 32
        assert config["hidden_size"] == 128 and config["num_attention_heads"] == 4
        assert config["intermediate_size"] == 256 and config["max_position_embeddings"] == 2048
        assert config["architectures"] == ["LlamaForCausalLM"]
        assert config["tie_word_embeddings"] is False
        assert config["num_hidden_layers"] == m["models"][tier]["layers"]
        assert json.loads((d / "generation_config.json").read_text())["eos_token_id"] == \
            config["eos_token_id"]


def test_vocab32k_tiers_share_tokenizer_embeddings_and_head(vocab32k_zoo):
    """The SLM and ILM are the LLM's early exits: same tokenizer, same embeddings, first layers,
    final norm and head."""
    from safetensors.torch import load_file

    assert len({_digest(vocab32k_zoo.model(t) / "tokenizer.json") for t in TIERS}) == 1
    assert _digest(vocab32k_zoo.llm / "tokenizer.json") == \
        vocab32k_zoo.manifest["tokenizer"]["sha256"]
    llm = load_file(vocab32k_zoo.llm / "model.safetensors")
    for tier in ("slm", "ilm"):
        sub = load_file(vocab32k_zoo.model(tier) / "model.safetensors")
        assert set(sub) < set(llm)
        assert all(torch.equal(v, llm[k]) for k, v in sub.items()), tier
    assert llm["lm_head.weight"].shape == (32_000, 128)
    assert not torch.equal(llm["lm_head.weight"], llm["model.embed_tokens.weight"])


def test_vocab32k_tokenizer_round_trips_and_every_id_decodes(vocab32k_zoo):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(vocab32k_zoo.slm)
    assert len(tok) == 32_000
    ids = tok(TEXT)["input_ids"]
    assert ids[0] == tok.bos_token_id  # BOS prepended, as Llama tokenizers do
    assert tok.decode(ids, skip_special_tokens=True) == TEXT
    for row in vocab32k_zoo.heldout_prompts(4):
        ids = tok(row["prompt"], add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == row["prompt"]
    pieces = tok.convert_ids_to_tokens(list(range(32_000)))
    assert all(isinstance(p, str) and p for p in pieces)
    assert tok.eos_token == "<|eos|>" and tok.bos_token == "<|bos|>"


def test_vllm_loads_vocab32k_and_decodes_like_transformers_at_t0(vocab32k_zoo, inproc_vllm):
    from transformers import AutoTokenizer
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    prompt = vocab32k_zoo.heldout_prompts(1)[0]["prompt"]
    prompt_ids = AutoTokenizer.from_pretrained(vocab32k_zoo.llm)(prompt)["input_ids"]
    llm = vllm_llm(vocab32k_zoo.llm)
    try:
        assert llm.llm_engine.model_config.get_vocab_size() == 32_000
        assert len(llm.get_tokenizer()) == 32_000
        assert llm.get_tokenizer().encode(prompt) == prompt_ids
        sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
        out = llm.generate([TokensPrompt(prompt_token_ids=prompt_ids)], sp, use_tqdm=False)
        got = out[0].outputs[0]
    finally:
        del llm
        gc.collect()
    assert len(got.token_ids) == 8 and got.text
    assert list(got.token_ids) == greedy_transformers(vocab32k_zoo.llm, prompt_ids, 8)


def test_vocab32k_is_reachable_like_the_trained_families(vocab32k_zoo, capsys):
    """zoo:vocab32k/<tier>, find_zoo, `hilm zoo show`, `hilm up --family` and `--zoo`."""
    import argparse

    from hilm_vllm.lab.bench import add_common_args
    from hilm_vllm.zoo import resolve_model
    from hilm_vllm.stack import family_plan, flag_value
    from hilm_vllm.zoo import find_zoo
    from hilm_vllm.zoo.cli import _show

    assert find_zoo("vocab32k").root == vocab32k_zoo.root
    assert resolve_model("zoo:vocab32k/slm") == str(vocab32k_zoo.slm)

    assert _show(argparse.Namespace(recipe="vocab32k", seed=0, json=False)) == 0
    out = capsys.readouterr().out
    assert '"random": true' in out and "gates: none (random weights" in out

    plan = family_plan("vocab32k", router_flags=["--policy", "hilm"])
    assert flag_value(plan.router, "--thresholds").endswith("thresholds-vocab32k.yaml")
    for tier in TIERS:
        config = flag_value(plan.engines[tier], "--config")
        assert config.endswith(f"vocab32k-{tier}.yaml")
        assert "draft-top-k" not in yaml.safe_load(open(config))  # a user's model, defaults

    p = argparse.ArgumentParser()
    add_common_args(p)
    assert p.parse_args(["--zoo", "vocab128k"]).zoo == "vocab128k"
    assert p.parse_args([]).zoo == "demo"


# ---- without weights: recipes, config, the tokenizer fill --------------------------------------

def test_random_recipes_are_hub_sized_and_keyed_apart():
    from hilm_vllm.zoo import RANDOM_RECIPES, RECIPES, get_recipe, recipe_names
    from hilm_vllm.zoo.random_family import RandomRecipe

    assert {"demo", "tiny", "vocab32k", "vocab128k"} <= set(recipe_names())
    assert not RANDOM_RECIPES.keys() & RECIPES.keys()
    big = get_recipe("vocab128k")
    assert isinstance(big, RandomRecipe) and big.vocab_size == 128_256
    assert get_recipe("vocab32k").vocab_size == 32_000
    for r in RANDOM_RECIPES.values():
        assert (r.hidden_size, r.head_dim, r.num_heads, r.intermediate_size) == (128, 32, 4, 256)
        assert (r.slm_layers, r.ilm_layers, r.num_layers) == (1, 2, 3)
        assert r.max_position_embeddings == 2048
    assert big.key().startswith("vocab128k-") and big.key() != big.with_seed(1).key()
    with pytest.raises(ValueError, match="head_dim"):
        dataclasses.replace(big, head_dim=16)
    with pytest.raises(ValueError, match="unknown zoo recipe"):
        get_recipe("vocab64k")


def test_vocab128k_config_and_weights_shapes_without_building():
    from types import SimpleNamespace

    from transformers import LlamaForCausalLM

    from hilm_vllm.zoo import get_recipe
    from hilm_vllm.zoo.random_family import norm_scale, random_config, tier_state

    r = get_recipe("vocab128k")
    tok = SimpleNamespace(bos_token_id=0, eos_token_id=1, pad_token_id=2)
    config = random_config(r, tok, r.slm_layers)
    assert config.vocab_size == 128_256 and config.tie_word_embeddings is False
    assert config.head_dim == 32 and config.num_hidden_layers == 1
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in LlamaForCausalLM(config).state_dict().items()}
    assert shapes["lm_head.weight"] == shapes["model.embed_tokens.weight"] == (128_256, 128)
    assert norm_scale(r) == pytest.approx(r.logit_std / (r.init_std * 128 ** 0.5))
    assert set(tier_state(dict.fromkeys(shapes), 1)) == set(shapes)


def test_random_weights_are_seeded_and_shaped_as_described():
    from hilm_vllm.zoo.random_family import RandomRecipe, norm_scale, random_state_dict

    r = RandomRecipe(name="t", vocab_size=2048, corpus_bytes=0, logit_std=4.0)
    shapes = {"model.embed_tokens.weight": (2048, 128), "lm_head.weight": (2048, 128),
              "model.norm.weight": (128,), "model.layers.0.input_layernorm.weight": (128,),
              "model.layers.0.self_attn.o_proj.weight": (128, 128),
              "model.layers.1.self_attn.o_proj.weight": (128, 128),
              "model.layers.2.mlp.down_proj.weight": (128, 256)}
    a, b = random_state_dict(r, shapes), random_state_dict(r, shapes)
    assert all(torch.equal(a[k], b[k]) for k in shapes)
    c = random_state_dict(r.with_seed(1), shapes)
    assert not torch.equal(a["lm_head.weight"], c["lm_head.weight"])
    assert torch.all(a["model.norm.weight"] == norm_scale(r))
    assert torch.all(a["model.layers.0.input_layernorm.weight"] == 1)
    std = {k: float(a[k].std()) for k in shapes if "norm" not in k}
    assert std["lm_head.weight"] == pytest.approx(0.02, rel=0.05)
    assert std["model.layers.0.self_attn.o_proj.weight"] == pytest.approx(0.02, rel=0.1)
    for deep in ("model.layers.1.self_attn.o_proj.weight", "model.layers.2.mlp.down_proj.weight"):
        assert std[deep] == pytest.approx(0.02 * r.deep_layer_scale, rel=0.1)


def test_fill_strings_are_new_ascii_and_deterministic():
    from hilm_vllm.zoo.random_family import FILL_ALPHABET, fill_strings

    vocab = {"aa": 0, "ab": 1, "Ġx": 2}
    got = fill_strings(vocab, 5000)
    assert got == fill_strings(vocab, 5000) and len(set(got)) == 5000
    assert got[:2] == ["ac", "ad"] and not set(got) & set(vocab)
    assert all(set(s) <= set(FILL_ALPHABET) for s in got)
    assert len(got[-1]) == 3  # 62^2 - 2 two-character strings, then three


def test_a_vocabulary_bpe_cannot_reach_is_filled_exactly(tmp_path):
    """What vocab128k does at 128,256, on a corpus small enough to run out of merges early."""
    from hilm_vllm.zoo.corpus import iter_texts
    from hilm_vllm.zoo.random_family import RandomRecipe, family_tokenizer

    r = RandomRecipe(name="t", vocab_size=12_000, corpus_bytes=60_000, logit_std=4.0)
    texts = [t for _, t in iter_texts(heldout=False, max_bytes=r.corpus_bytes)]
    tok, trained, filled = family_tokenizer(r, texts)
    assert filled > 0 and trained + filled == len(tok) == 12_000
    assert tok.decode(tok(TEXT)["input_ids"], skip_special_tokens=True) == TEXT
    assert all(tok.decode([i]) for i in range(trained, 12_000))  # fill ids decode ...
    assert max(i for t in texts[:5] for i in tok(t)["input_ids"]) < trained  # ... never encoded
    tok.save_pretrained(str(tmp_path))
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(tmp_path)
    assert len(again) == 12_000 and again.decode([11_999]) == tok.decode([11_999])
    tok2, _, _ = family_tokenizer(r, texts)
    assert tok2.backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()


@pytest.mark.slow
def test_random_build_is_deterministic_for_a_seed(tmp_path, monkeypatch):
    from hilm_vllm.zoo import ensure_zoo, get_recipe

    monkeypatch.setenv("HILM_ZOO_DIR", str(tmp_path))
    quick = dataclasses.replace(get_recipe("vocab32k"), vocab_size=8_000, corpus_bytes=400_000,
                                eval_windows=2)
    a = ensure_zoo(quick, progress=False)
    digest = _digest(a.llm / "model.safetensors")
    measured = {k: v for k, v in a.manifest.items() if k != "build"}
    b = ensure_zoo(quick, progress=False, force=True)
    assert _digest(b.llm / "model.safetensors") == digest
    assert {k: v for k, v in json.loads((b.root / "manifest.json").read_text()).items()
            if k != "build"} == measured
    assert not list(tmp_path.glob("*.partial"))
    c = ensure_zoo(quick, seed=1, progress=False)
    assert c.root != a.root and _digest(c.llm / "model.safetensors") != digest
