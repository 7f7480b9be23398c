"""Data preparation and loading: corpora -> tokenized HDF5 shards -> training batches.

Importing this package is cheap (no torch, no h5py); the submodules import what they need.
"""
from hpcllm.data.loader import BatchLoader, DatasetInfo, EvalBatches  # noqa: F401
from hpcllm.data.tokenizer import load_tokenizer, tokenizer_from_dataset  # noqa: F401


def run_preprocess(inputs, out, **options):
    """See :func:`hpcllm.data.preprocess.run_preprocess`."""
    from hpcllm.data.preprocess import run_preprocess as _run

    return _run(inputs, out, **options)
