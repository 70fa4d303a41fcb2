"""Package list only (everything else is in pyproject.toml): the top-level `patches/` folder
ships as the package `hilm_vllm_patches`, so its import name cannot collide with anything."""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["hilm_vllm", "hilm_vllm.*"]), "hilm_vllm_patches"],
    package_dir={"hilm_vllm_patches": "patches"},
)
