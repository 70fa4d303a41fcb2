"""Package list only (everything else is in pyproject.toml): `patches/hilm_vllm_patches/` (the
vLLM fixes; their notes for upstream are patches/README.md) ships as the package of that name, and
`engine_configs/` as `hilm_vllm/engine_configs/` (data: `hilm up --family demo` and the benchmarks
find the family's configs and thresholds in an installed package too)."""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["hilm_vllm", "hilm_vllm.*"]), "hilm_vllm_patches",
              "hilm_vllm.engine_configs"],
    package_dir={"hilm_vllm_patches": "patches/hilm_vllm_patches",
                 "hilm_vllm.engine_configs": "engine_configs"},
)
