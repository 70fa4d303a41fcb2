"""`python bench/demo.py ARGS` = `hilm bench demo ARGS`: the benchmark is
hilm_vllm/lab/bench/demo.py (in the package); `--help` says what it measures."""

import sys

from hilm_vllm.lab.bench import main

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
