"""`hilm bench vllm-serve`: the result files it saved name the home directory `~`."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from hilm_vllm.lab.bench.vllm_serve import unhome


def test_saved_results_name_the_home_directory_tilde(tmp_path, monkeypatch):
    home = tmp_path / "home" / "user"
    monkeypatch.setattr(Path, "home", classmethod(lambda cls: home))
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"tokenizer_id": f"{home}/.cache/zoo/llm"}))
    os.utime(old, (time.time() - 100, time.time() - 100))
    since = time.time() - 1
    new = tmp_path / "new.json"
    new.write_text(json.dumps({"tokenizer_id": f"{home}/.cache/zoo/llm", "n": 1}))
    assert unhome(tmp_path, since) == [new]
    assert json.loads(new.read_text()) == {"tokenizer_id": "~/.cache/zoo/llm", "n": 1}
    assert str(home) in old.read_text()  # another run's file is left as it is
