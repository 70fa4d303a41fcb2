"""`python bench/soak.py ARGS` = `hilm bench soak ARGS`: the benchmark is
hilm_vllm/lab/bench/soak.py (in the package); `--help` says what it measures."""

import sys

from hilm_vllm.lab.bench import main

if __name__ == "__main__":
    sys.exit(main(["soak", *sys.argv[1:]]))
