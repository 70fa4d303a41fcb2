"""The import graph keeps its shape: the contracts of [tool.importlinter] in pyproject.toml
(layers with no circles and no upward imports; serving never imports the lab; the router loads
no engine code) hold, and a broken contract fails this test with import-linter's report."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_import_contracts_are_kept():
    lint = Path(sys.executable).with_name("lint-imports")
    run = subprocess.run([str(lint), "--config", str(REPO / "pyproject.toml")], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "0 broken" in run.stdout and "3 kept" in run.stdout, run.stdout[-2000:]


def test_a_contract_that_is_broken_is_reported(tmp_path):
    """The check can fail: a contract the graph breaks (the router may not import the
    router's own engine module) is reported broken."""
    config = tmp_path / "contracts.toml"
    config.write_text('[tool.importlinter]\nroot_packages = ["hilm_vllm"]\n\n'
                      '[[tool.importlinter.contracts]]\nname = "deliberately broken"\n'
                      'type = "forbidden"\nsource_modules = ["hilm_vllm.router.tier"]\n'
                      'forbidden_modules = ["hilm_vllm.router.engine"]\n')
    lint = Path(sys.executable).with_name("lint-imports")
    run = subprocess.run([str(lint), "--config", str(config)], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode != 0 and "1 broken" in run.stdout, run.stdout[-2000:]
