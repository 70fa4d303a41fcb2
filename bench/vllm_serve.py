"""`python bench/vllm_serve.py ARGS` = `hilm bench vllm-serve ARGS`: the benchmark is
hilm_vllm/lab/bench/vllm_serve.py (in the package); `--help` says what it measures."""

import sys

from hilm_vllm.lab.bench import main

if __name__ == "__main__":
    sys.exit(main(["vllm-serve", *sys.argv[1:]]))
