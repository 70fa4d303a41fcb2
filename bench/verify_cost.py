"""`python bench/verify_cost.py ARGS` = `hilm bench verify-cost ARGS`: the benchmark is
hilm_vllm/lab/bench/verify_cost.py (in the package); `--help` says what it measures."""

import sys

from hilm_vllm.lab.bench import main

if __name__ == "__main__":
    sys.exit(main(["verify-cost", *sys.argv[1:]]))
