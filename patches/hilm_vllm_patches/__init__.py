"""vLLM fixes shipped as `vllm.general_plugins`, installed as `hilm_vllm_patches`.

Each module holds one fix, a `register()` entry point that is idempotent (vLLM calls general
plugins in the API process, the engine core and every worker), and a note for upstream in
this folder's README.md.
"""
