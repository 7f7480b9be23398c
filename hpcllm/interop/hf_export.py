"""``hpcllm export --format hf``: any checkpoint as a directory ``transformers`` loads offline
(the mapping is :mod:`hpcllm.interop.hf`'s; this module adds the files around it)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path


from hpcllm.errors import HpcllmError
from hpcllm.interop import safetensors_io as st
from hpcllm.interop.hf import DEFAULT_MAX_SHARD_BYTES, DTYPES, TORCH_DTYPE_NAMES, byte_tokenizer_json, to_hf


def export_hf(source, out, dtype: str = "fp32", max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> dict:
    """Write ``out/`` (config.json, model.safetensors [+ index], generation_config.json,
    tokenizer.json, tokenizer_config.json) for a run dir, checkpoint dir or exported file.
    The directory appears complete or not at all. Returns a summary."""
    from hpcllm.infer.generate import load_model
    from hpcllm.locking import lock_file

    if dtype not in DTYPES:
        raise HpcllmError(f"--dtype {dtype}: choose {', '.join(DTYPES)}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise HpcllmError(f"--out {out}: is a file; HF export writes a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / "config.json").is_file():
        raise HpcllmError(f"--out {out}: exists, is not empty and holds no config.json (not an earlier export); "
                          "choose another directory")
    loaded = load_model(source, device="cpu")
    from hpcllm.model.gpt import GPTConfig

    cfg = GPTConfig(**loaded.model_config)
    if cfg.moe_experts:
        raise HpcllmError(f"{source}: --format hf: a mixture of experts ({cfg.moe_experts} experts) has no "
                          "GPT-2/NeoX/Llama equivalent in transformers; use the native export (--format hpcllm)")
    if getattr(loaded, "quantization", None):  # an INT8 export: its dequantized weights (the plain names)
        from hpcllm.infer.quantize import dequantized_state_dict

        state = dequantized_state_dict(loaded.model)
    else:
        state = {k: v.detach() for k, v in loaded.model.state_dict().items()}
    tok = loaded.tokenizer
    config, tensors = to_hf(cfg, state, tok.eod_id)
    want = DTYPES[dtype]
    tensors = {k: v.to(want).contiguous() for k, v in tensors.items()}
    config["torch_dtype"] = config["dtype"] = TORCH_DTYPE_NAMES[want]

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    with lock_file(out.with_name(out.name + ".lock")):
        try:
            tmp.mkdir()
            files = _write_shards(tmp, tensors, max_shard_bytes)
            _write_json(tmp / "config.json", config)
            gen = {"bos_token_id": tok.eod_id, "eos_token_id": tok.eod_id, "pad_token_id": tok.eod_id,
                   "do_sample": False}
            if cfg.padded_vocab > tok.vocab_size:
                gen["suppress_tokens"] = list(range(tok.vocab_size, cfg.padded_vocab))
            _write_json(tmp / "generation_config.json", gen)
            _write_tokenizer(tmp, tok, cfg, loaded.source)
            if out.exists():
                old = out.with_name(f".{out.name}.old{os.getpid()}")
                os.replace(out, old)
                os.replace(tmp, out)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, out)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            from hpcllm.fileio import write_error

            raise write_error("the HF export", e.filename or out, e) from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return {"source": loaded.source, "out": str(out), "class": config["architectures"][0], "files": files,
            "dtype": dtype, "bytes": sum(st.tensor_bytes(t) for t in tensors.values())}


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def _write_shards(d: Path, tensors: dict, max_bytes: int) -> list[str]:
    groups, cur, size = [], [], 0
    for name in sorted(tensors, key=_natural):
        n = st.tensor_bytes(tensors[name])
        if cur and size + n > max_bytes:
            groups.append(cur)
            cur, size = [], 0
        cur.append(name)
        size += n
    groups.append(cur)
    meta = {"format": "pt"}
    if len(groups) == 1:
        st.write_file(d / "model.safetensors", tensors, meta)
        return ["model.safetensors"]
    names, weight_map = [], {}
    for i, g in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        st.write_file(d / fname, {k: tensors[k] for k in g}, meta)
        names.append(fname)
        weight_map.update({k: fname for k in g})
    total = sum(st.tensor_bytes(t) for t in tensors.values())
    _write_json(d / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
    return names + ["model.safetensors.index.json"]


def _natural(name: str):
    return [int(p) if p.isdigit() else p for p in name.replace(".", " . ").split()]


def _write_tokenizer(d: Path, tok, cfg, source: str) -> None:
    from hpcllm.data.tokenizer import EOD_TOKEN

    if tok.type == "byte":
        text = byte_tokenizer_json()
    else:
        path = getattr(tok, "path", None)
        if not path or not Path(path).is_file():
            raise HpcllmError(f"{source}: the BPE tokenizer's file is gone; cannot export it")
        text = Path(path).read_text(encoding="utf-8")
    (d / "tokenizer.json").write_text(text, encoding="utf-8")
    eod = getattr(tok, "eod_token", EOD_TOKEN)
    _write_json(d / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": eod, "eos_token": eod, "unk_token": None,
        "model_max_length": cfg.seq_len, "clean_up_tokenization_spaces": False, "add_prefix_space": False,
        "hpcllm_tokenizer": tok.type, "hpcllm_tokenizer_sha256": tok.sha256})
