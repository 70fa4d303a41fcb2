"""`python bench/sweep.py ARGS` = `hilm bench sweep ARGS`: the benchmark is
hilm_vllm/lab/bench/sweep.py (in the package); `--help` says what it measures."""

import sys

from hilm_vllm.lab.bench import main

if __name__ == "__main__":
    sys.exit(main(["sweep", *sys.argv[1:]]))
