"""The demo family's quality ladder and uncertainty gates (minutes to build the first time:
slow)."""

import pytest


@pytest.mark.slow
@pytest.mark.timeout(3600)  # ~20 min to build on 2 idle cores, more on a busy machine
def test_demo_ladder_holds(demo_zoo):
    m = demo_zoo.manifest
    loss, acc = m["heldout_loss"], m["acceptance"]
    assert loss["llm"] < loss["ilm"] < loss["slm"], loss
    assert acc["slm->llm"] < acc["ilm->llm"], acc
    assert acc["slm->llm"] < acc["slm->ilm"], acc
    assert m["heldout_prompts"] >= 32


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_demo_gates_predict_rejection(demo_zoo):
    """The family is one where the uncertainty mechanism exists (DESIGN: a gate with AUC >= 0.7
    for SLM->LLM rejection), and skipping the most certain drafts costs less than skipping at
    random."""
    g = demo_zoo.manifest["gates"]
    assert g["slm->llm"]["perturbed"]["auc"] >= 0.70, g["slm->llm"]["perturbed"]
    assert g["slm->ilm"]["perturbed"]["auc"] >= 0.65, g["slm->ilm"]["perturbed"]
    for pair in ("slm->ilm", "slm->llm", "ilm->llm"):
        risk = g[pair]["perturbed"]["risk"]
        assert risk[2] < g[pair]["mean_beta"], (pair, risk)  # skip 30%
