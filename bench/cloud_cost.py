"""`python bench/cloud_cost.py ARGS` = `hilm bench cloud-cost ARGS`: the benchmark is
hilm_vllm/lab/bench/cloud_cost.py (in the package); `--help` says what it measures."""

import sys

from hilm_vllm.lab.bench import main

if __name__ == "__main__":
    sys.exit(main(["cloud-cost", *sys.argv[1:]]))
