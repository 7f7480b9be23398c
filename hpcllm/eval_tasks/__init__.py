"""lm-evaluation-harness tasks shipped with hpcllm (YAML + JSON lines; see hpcllm/interop/lm_eval_adapter.py)."""
