"""`python -m hpcllm ...` is the same as the `hpcllm` command."""
from hpcllm.cli import main

main()
