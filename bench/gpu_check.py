"""`python bench/gpu_check.py ARGS` = `hilm bench gpu-check ARGS`: the benchmark is
hilm_vllm/lab/bench/gpu_check.py (in the package); `--help` says what it measures."""

import sys

from hilm_vllm.lab.bench import main

if __name__ == "__main__":
    sys.exit(main(["gpu-check", *sys.argv[1:]]))
