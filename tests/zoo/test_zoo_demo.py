"""The demo family's quality ladder (minutes to build the first time: slow)."""

import pytest


@pytest.mark.slow
@pytest.mark.timeout(3600)  # ~15 min to build on 2 idle cores, more on a busy machine
def test_demo_ladder_holds(demo_zoo):
    m = demo_zoo.manifest
    loss, acc = m["heldout_loss"], m["acceptance"]
    assert loss["llm"] < loss["ilm"] < loss["slm"], loss
    assert acc["slm->llm"] < acc["ilm->llm"], acc
    assert acc["slm->llm"] < acc["slm->ilm"], acc
    assert m["heldout_prompts"] >= 32
