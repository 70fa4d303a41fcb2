"""`python bench/drafter_overhead.py ARGS` = `hilm bench drafter-overhead ARGS`: the benchmark is
hilm_vllm/lab/bench/drafter_overhead.py (in the package); `--help` says what it measures."""

import sys

from hilm_vllm.lab.bench import main

if __name__ == "__main__":
    sys.exit(main(["drafter-overhead", *sys.argv[1:]]))
