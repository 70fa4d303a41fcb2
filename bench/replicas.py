"""`python bench/replicas.py ARGS` = `hilm bench replicas ARGS`: the benchmark is
hilm_vllm/lab/bench/replicas.py (in the package); `--help` says what it measures."""

import sys

from hilm_vllm.lab.bench import main

if __name__ == "__main__":
    sys.exit(main(["replicas", *sys.argv[1:]]))
