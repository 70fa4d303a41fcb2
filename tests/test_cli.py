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

    from hilm_vllm.bench import BENCHMARKS

    repo = Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path), str(repo)], check=True, timeout=600,
                   cwd=tmp_path)
    (wheel,) = tmp_path.glob("hilm_vllm-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for module, _ in BENCHMARKS.values():
        assert f"hilm_vllm/bench/{module}.py" in names
    shipped = {n.rsplit("/", 1)[1] for n in names if n.startswith("hilm_vllm/engine_configs/")}
    assert shipped == {p.name for p in (repo / "engine_configs").glob("*.yaml")}
    assert "hilm_vllm_patches/shm_busy_loop.py" in names
    assert not any(n.startswith(("bench/", "tests/")) for n in names)
