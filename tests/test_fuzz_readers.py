"""Every on-disk reader, fed truncated and mutated files, either reads them or raises one
`HpcllmError` line naming the file: never another exception (a traceback at the CLI).

Readers: the dataset manifest (DatasetInfo, BatchLoader, inspect), a checkpoint's
trainer.json and config.json (what `hpcllm train --resume` checks before MPI starts), its
model and optimizer files (CheckpointReader, generate), a job-array part's state.json (merge),
the preprocess resume state (state.sqlite), tokenizer.json, and an exported model file. The
mutations are deterministic (seeded): every field deleted, set to null, a string, -1, a list,
an object; the file truncated at several points; bytes flipped."""
import copy
import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from hpcllm.errors import HpcllmError
from tests.train.conftest import TINY, build_dataset, run_train

VALUES = [None, "x", -1, [], {}, 1.5e300]


def _paths(obj, prefix=(), depth=3):
    """Key paths of a JSON document (the first item of each list)."""
    if depth == 0:
        return
    items = obj.items() if isinstance(obj, dict) else ([(0, obj[0])] if isinstance(obj, list) and obj else [])
    for k, v in items:
        yield prefix + (k,)
        yield from _paths(v, prefix + (k,), depth - 1)


def json_mutations(doc):
    """(label, mutated document) pairs."""
    for path in _paths(doc):
        parent = doc
        for k in path[:-1]:
            parent = parent[k]
        if isinstance(parent, dict):
            m = copy.deepcopy(doc)
            p = m
            for k in path[:-1]:
                p = p[k]
            del p[path[-1]]
            yield f"del {path}", m
        for v in VALUES:
            m = copy.deepcopy(doc)
            p = m
            for k in path[:-1]:
                p = p[k]
            p[path[-1]] = v
            yield f"{path}={v!r}", m


def byte_mutations(data: bytes, seed=0, flips=6):
    rng = random.Random(seed)
    for frac in (0.0, 0.1, 0.5, 0.9, 0.99):
        yield f"truncated at {frac}", data[:int(len(data) * frac)]
    for i in range(flips):
        b = bytearray(data)
        for _ in range(8):
            j = rng.randrange(len(b))
            b[j] ^= 1 << rng.randrange(8)
        yield f"flips {i}", bytes(b)


def expect_clean(fn, label, name):
    """``fn()`` either works or raises one-line HpcllmError naming ``name``."""
    try:
        fn()
    except HpcllmError as e:
        msg = str(e)
        assert "\n" not in msg and len(msg) <= 700, (label, msg)
        assert name in msg, (label, msg)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A dataset, a finished 2-step run (checkpoint, export), an unfinished preprocess run and
    a job-array part."""
    d = tmp_path_factory.mktemp("fuzz")
    data = build_dataset(d / "ds", n_docs=120)
    run = d / "run"
    run_train([*TINY, "--data", str(data), "--out", str(run), "--steps", "2", "--ckpt-every", "2"])
    from hpcllm.infer.export import export_checkpoint

    export_checkpoint(run, d / "model.pt")
    from hpcllm.data.preprocess import run_preprocess
    from tests.train.conftest import make_text

    src = d / "src.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in make_text(300, seed=2)))
    run_preprocess([str(src)], str(d / "parts"), tokenizer="byte", num_tasks=2, task_id=0, workers=1)
    return {"dir": d, "data": data, "run": run, "ckpt": run / "checkpoints" / "step-00000002",
            "export": d / "model.pt", "src": src, "parts": d / "parts"}


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_manifest(world, tmp_path):
    from hpcllm.data.inspect import inspect_dataset
    from hpcllm.data.loader import BatchLoader, DatasetInfo

    base = json.loads((world["data"] / "manifest.json").read_text())
    d = _copy(world["data"], tmp_path / "ds")
    cases = list(json_mutations(base))
    cases += [(label, data) for label, data in byte_mutations(json.dumps(base).encode())]
    assert len(cases) > 100
    for label, doc in cases:
        (d / "manifest.json").write_bytes(doc if isinstance(doc, bytes) else json.dumps(doc).encode())

        def read():
            DatasetInfo(str(d))
            BatchLoader(str(d), split="train", seq_len=16, micro_batch=2, accum=1)
            inspect_dataset(str(d))
        expect_clean(read, label, str(d))


def _prepare(ck: Path, data: Path, out: Path):
    from hpcllm.config import build_config
    from hpcllm.train.setup import prepare

    flags = dict(zip([a.lstrip("-").replace("-", "_") for a in TINY[0::2]], TINY[1::2]))
    flags = {k: (int(v) if v.isdigit() else v) for k, v in flags.items()}
    flags.update(lr=3e-3, data=str(data), out=str(out), steps=4, resume=str(ck))
    return prepare(build_config(**flags))


@pytest.mark.parametrize("name", ["trainer.json", "config.json"])
def test_checkpoint_json(world, tmp_path, name):
    from hpcllm.infer.generate import load_model

    base = json.loads((world["ckpt"] / name).read_text())
    ck = _copy(world["ckpt"], tmp_path / "run" / "checkpoints" / "step-00000002")
    for label, doc in [*json_mutations(base), *byte_mutations(json.dumps(base).encode())]:
        (ck / name).write_bytes(doc if isinstance(doc, bytes) else json.dumps(doc).encode())
        expect_clean(lambda: _prepare(ck, world["data"], tmp_path / "run"), label, str(ck))
        expect_clean(lambda: load_model(ck), label, str(ck))


@pytest.mark.parametrize("name", ["model-00000.pt", "optim-00000.pt"])
def test_checkpoint_tensor_files(world, tmp_path, name):
    from hpcllm.infer.generate import load_model
    from hpcllm.train.checkpoint import CheckpointReader

    data = (world["ckpt"] / name).read_bytes()
    ck = _copy(world["ckpt"], tmp_path / "step-00000002")
    for label, blob in byte_mutations(data):
        (ck / name).write_bytes(blob)

        def read():
            r = CheckpointReader(ck)
            r.model_state()
            r.optim_state(r.names())
            load_model(ck)
        expect_clean(read, label, str(ck))


def test_export_file_and_tokenizer_json(world, tmp_path):
    from hpcllm.data.tokenizer import load_tokenizer, train_bpe
    from hpcllm.infer.generate import load_model

    f = tmp_path / "model.pt"
    for label, blob in byte_mutations(world["export"].read_bytes()):
        f.write_bytes(blob)
        expect_clean(lambda: load_model(f), label, str(f))
    # a well-formed PyTorch file holding a payload of the wrong structure
    payload = torch.load(world["export"], weights_only=True)
    small = {k: v for k, v in payload.items() if k != "model"}
    small["model"] = dict(list(payload["model"].items())[:2])
    for label, doc in list(json_mutations(small))[:120]:
        doc = {**doc, "model": {**payload["model"], **doc["model"]}} if isinstance(doc.get("model"), dict) else doc
        torch.save(doc, f)
        expect_clean(lambda: load_model(f), label, str(f))
    tok = train_bpe(iter(["the cluster trains the model"] * 50), 300, str(tmp_path / "tok.json"), min_frequency=1)
    text = Path(tok.path).read_bytes()
    t = tmp_path / "t.json"
    cases = [*byte_mutations(text), *json_mutations(json.loads(text))]
    for label, doc in cases[:80]:
        t.write_bytes(doc if isinstance(doc, bytes) else json.dumps(doc).encode())
        expect_clean(lambda: load_tokenizer(str(t)), label, str(t))


def test_preprocess_part_state_and_resume_state(world, tmp_path):
    from hpcllm.data.preprocess import merge_parts, run_preprocess

    from hpcllm.data.preprocess import part_dir

    part = Path(part_dir("", 2, 0)) / "state.json"
    base = json.loads((world["parts"] / part).read_text())
    for label, doc in [*json_mutations(base), *byte_mutations(json.dumps(base).encode())]:
        d = tmp_path / "p"
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(world["parts"], d)
        (d / part).write_bytes(doc if isinstance(doc, bytes) else json.dumps(doc).encode())
        expect_clean(lambda: merge_parts(str(d), progress=False), label, "state.json")
        expect_clean(lambda: run_preprocess([str(world["src"])], str(d), tokenizer="byte", num_tasks=2, task_id=0,
                                            workers=1, progress=False), label, str(d))
    # the packer's resume state: a run stopped by --strict at a bad last line keeps its state
    src = tmp_path / "src.jsonl"
    src.write_text(world["src"].read_text() + "{not json\n")
    out = tmp_path / "unfinished"
    opts = dict(tokenizer="byte", workers=1, progress=False, item_bytes=4096)
    with pytest.raises(HpcllmError, match="malformed JSON"):
        run_preprocess([str(src)], str(out), strict=True, **opts)
    saved = _copy(out, tmp_path / "saved")
    db = out / ".work" / "state.sqlite"
    for label, blob in byte_mutations((saved / ".work" / "state.sqlite").read_bytes()):
        shutil.rmtree(out)
        _copy(saved, out)  # the unfinished run as it was, but for its database
        for side in out.glob(".work/state.sqlite-*"):  # the write-ahead log would repair it
            side.unlink()
        db.write_bytes(blob)
        expect_clean(lambda: run_preprocess([str(src)], str(out), **opts), label, str(out))
