"""The tiny zoo: builds, loads in vLLM and transformers, and both decode it identically."""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json

import pytest
import torch

from tests.conftest import vllm_llm
from tests.zoo.helpers import greedy_transformers

TIERS = ("slm", "ilm", "llm")


def test_manifest_has_what_it_promises(tiny_zoo):
    m = tiny_zoo.manifest
    assert set(m["models"]) == set(TIERS)
    assert m["models"]["slm"]["parameters"] < m["models"]["ilm"]["parameters"] < \
        m["models"]["llm"]["parameters"]
    assert set(m["acceptance"]) == {"slm->ilm", "slm->llm", "ilm->llm"}
    assert all(0 < v <= 1 for v in m["acceptance"].values())
    assert m["training"]["tokens"] > 0 and m["training"]["seconds"] > 0
    gates = m["gates"]
    assert gates["positions"] == m["eval_tokens"]
    for pair in ("slm->ilm", "slm->llm", "ilm->llm"):
        for gate in ("perturbed", "entropy", "var-entropy", "max-prob", "1-q", "oracle"):
            g = gates[pair][gate]
            assert 0 <= g["auc"] <= 1 and -1 <= g["spearman"] <= 1, (pair, gate, g)
            assert len(g["risk"]) == len(gates["skip_grid"])
        assert gates[pair]["oracle"]["auc"] >= gates[pair]["perturbed"]["auc"]
        assert 0 <= gates[pair]["mean_beta"] <= 1
    prompts = tiny_zoo.heldout_prompts()
    assert prompts and all(p["prompt"] and p["reference"] for p in prompts)
    for tier in TIERS:
        d = tiny_zoo.model(tier)
        assert (d / "model.safetensors").is_file() and (d / "tokenizer.json").is_file()
        assert json.loads((d / "config.json").read_text())["head_dim"] in (32, 64, 80, 96, 112, 128)
        assert (d / "generation_config.json").is_file()


@pytest.mark.parametrize("tier", TIERS)
def test_vllm_matches_transformers_at_t0(tiny_zoo, inproc_vllm, tier):
    from transformers import AutoTokenizer
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    model_dir = tiny_zoo.model(tier)
    tok = AutoTokenizer.from_pretrained(model_dir)
    prompt_ids = tok(tiny_zoo.heldout_prompts(1)[0]["prompt"])["input_ids"]
    assert prompt_ids[0] == tok.bos_token_id  # the tokenizer adds BOS, as Llama's do

    llm = vllm_llm(model_dir)
    try:
        assert llm.get_tokenizer().encode(tiny_zoo.heldout_prompts(1)[0]["prompt"]) == prompt_ids
        sp = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
        out = llm.generate([TokensPrompt(prompt_token_ids=prompt_ids)], sp, use_tqdm=False)
        got = list(out[0].outputs[0].token_ids)
    finally:
        del llm
        gc.collect()
    assert got == greedy_transformers(model_dir, prompt_ids, 32)


def test_exported_models_are_the_early_exits(tiny_zoo):
    """The saved SLM is exactly the first layers of the LLM with its norm and head."""
    from transformers import AutoModelForCausalLM

    from hilm_vllm.zoo.train import exit_logits

    llm = AutoModelForCausalLM.from_pretrained(tiny_zoo.llm, dtype=torch.float32).eval()
    slm = AutoModelForCausalLM.from_pretrained(tiny_zoo.slm, dtype=torch.float32).eval()
    ids = torch.randint(7, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        early = exit_logits(llm, ids, (slm.config.num_hidden_layers,))[0]
        assert torch.allclose(early, slm(input_ids=ids).logits, atol=1e-5)


def _weights_digest(root) -> str:
    return hashlib.sha256((root / "llm" / "model.safetensors").read_bytes()).hexdigest()


def _measured(manifest: dict) -> dict:
    """The manifest without what depends on the clock."""
    return {k: v for k, v in manifest.items() if k != "training"}


def test_build_is_deterministic_for_a_seed(tmp_path, monkeypatch):
    from hilm_vllm.zoo import ensure_zoo, get_recipe

    monkeypatch.setenv("HILM_ZOO_DIR", str(tmp_path))
    # A shortened tiny recipe: determinism does not need a useful model.
    quick = dataclasses.replace(get_recipe("tiny"), train_tokens=8192, corpus_bytes=300_000)
    a = ensure_zoo(quick, progress=False)
    digest, manifest = _weights_digest(a.root), _measured(a.manifest)
    b = ensure_zoo(quick, progress=False, force=True)
    assert a.root == b.root and _weights_digest(b.root) == digest
    assert _measured(json.loads((b.root / "manifest.json").read_text())) == manifest
    c = ensure_zoo(quick, seed=1, progress=False)
    assert c.root != a.root and _weights_digest(c.root) != digest
