"""`python bench/round_cost.py ARGS` = `hilm bench round-cost ARGS`: the benchmark is
hilm_vllm/lab/bench/round_cost.py (in the package); `--help` says what it measures."""

import sys

from hilm_vllm.lab.bench import main

if __name__ == "__main__":
    sys.exit(main(["round-cost", *sys.argv[1:]]))
