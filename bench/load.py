"""`python bench/load.py ARGS` = `hilm bench load ARGS`: the benchmark is
hilm_vllm/lab/bench/load.py (in the package); `--help` says what it measures."""

import sys

from hilm_vllm.lab.bench import main

if __name__ == "__main__":
    sys.exit(main(["load", *sys.argv[1:]]))
