"""Command-line entry points answer --help and fail clearly."""

import subprocess
import sys


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300)


def test_hilm_help_lists_subcommands():
    r = run("-m", "hilm_vllm.cli", "--help")
    assert r.returncode == 0 and "zoo" in r.stdout and "dsi" in r.stdout


def test_zoo_path_of_an_unbuilt_zoo_says_how_to_build_it(tmp_path):
    import os

    env = dict(os.environ, HILM_ZOO_DIR=str(tmp_path))
    r = subprocess.run([sys.executable, "-m", "hilm_vllm.cli", "zoo", "path", "--recipe", "demo"],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 1 and "hilm zoo build --recipe demo" in r.stderr


def test_hilm_serve_help_passes_vllm_engine_flags_through():
    r = run("-m", "hilm_vllm.serve", "--tier", "llm", "--help")
    assert r.returncode == 0, r.stderr
    for flag in ("--tier", "--metrics-port", "--model", "--max-model-len",
                 "--tensor-parallel-size", "--enable-prefix-caching"):
        assert flag in r.stdout, flag


def test_an_installed_wheel_has_every_benchmark_and_the_engine_configs(tmp_path):
    """`hilm bench NAME` and `hilm up --family demo` from a plain (non-editable) install: the
    wheel carries the benchmark modules and engine_configs/ (as hilm_vllm/engine_configs)."""
    import zipfile
    from pathlib import Path

    from hilm_vllm.lab.bench import BENCHMARKS

    repo = Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path), str(repo)], check=True, timeout=600,
                   cwd=tmp_path)
    (wheel,) = tmp_path.glob("hilm_vllm-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for module, _ in BENCHMARKS.values():
        assert f"hilm_vllm/lab/bench/{module}.py" in names
    shipped = {n.rsplit("/", 1)[1] for n in names if n.startswith("hilm_vllm/engine_configs/")}
    assert shipped == {p.name for p in (repo / "engine_configs").glob("*.yaml")}
    assert "hilm_vllm_patches/shm_busy_loop.py" in names
    assert not any(n.startswith(("bench/", "tests/")) for n in names)


def test_dataclass_caps_are_declared_and_read_back_as_flags():
    """server.flags.add_field_flags / fields_from_args: one --field flag per cap, its default
    the dataclass's, read back into the dataclass (defaults when the namespace lacks a flag, the
    dataclass's own check naming the flag)."""
    import argparse

    import pytest

    from hilm_vllm.router.admission import AdmissionLimits
    from hilm_vllm.server.flags import add_field_flags, fields_from_args

    p = argparse.ArgumentParser()
    add_field_flags(p.add_argument_group("g"), AdmissionLimits(),
                    {"max_active_choices": "a", "max_queued_requests": "b",
                     "max_queued_per_client": "c"})
    assert fields_from_args(AdmissionLimits, p.parse_args([])) == AdmissionLimits()
    got = fields_from_args(AdmissionLimits, p.parse_args(["--max-queued-per-client", "3"]))
    assert got == AdmissionLimits(max_queued_per_client=3)
    assert fields_from_args(AdmissionLimits, argparse.Namespace()) == AdmissionLimits()
    with pytest.raises(ValueError, match="--max-active-choices"):
        fields_from_args(AdmissionLimits, p.parse_args(["--max-active-choices", "0"]))
    assert "(default: 256)" in p.format_help()
