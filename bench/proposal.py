"""`python bench/proposal.py ARGS` = `hilm bench proposal ARGS`: the benchmark is
hilm_vllm/lab/bench/proposal.py (in the package); `--help` says what it measures."""

import sys

from hilm_vllm.lab.bench import main

if __name__ == "__main__":
    sys.exit(main(["proposal", *sys.argv[1:]]))
