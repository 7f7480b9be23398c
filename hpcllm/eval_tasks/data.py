"""Datasets of the shipped lm-evaluation-harness tasks: JSON lines next to this file, loaded
without the network (lm-eval's ``custom_dataset`` hook; paths are this directory's, so the
tasks work from any working directory)."""
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))


def _load(name: str):
    import datasets

    with open(os.path.join(HERE, name), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def ppl_dataset(**_metadata):
    return _load("hpcllm_ppl.jsonl")


def mc_dataset(**_metadata):
    return _load("hpcllm_mc.jsonl")
