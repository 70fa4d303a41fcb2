"""`python bench/faults.py ARGS` = `hilm bench faults ARGS`: the benchmark is
hilm_vllm/lab/bench/faults.py (in the package); `--help` says what it measures."""

import sys

from hilm_vllm.lab.bench import main

if __name__ == "__main__":
    sys.exit(main(["faults", *sys.argv[1:]]))
