"""Sampling text from a trained model: one process, CPU or GPU, no MPI.

A model source is one of
- a run directory (``RUN/checkpoints/latest`` names the newest complete checkpoint),
- a checkpoint directory (``RUN/checkpoints/step-00000100/``), or
- a single file written by ``hpcllm export`` (see :func:`export_payload`).

The tokenizer is the one the model was trained with: a checkpoint records the dataset's
tokenizer sha256, and the tokenizer is loaded (from a copy in the checkpoint, from the dataset
directory named in its config.json, or from the exported file) and checked against that hash,
because decoding with another vocabulary produces plausible-looking garbage.

``load_model(..., int8=True)`` quantizes the weights after loading (:mod:`hpcllm.infer.quantize`);
an exported file written with ``hpcllm export --int8`` (its ``quantization`` field) loads as
the quantized model without ever materialising the fp32 weights.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hpcllm.errors import HpcllmError, excerpt
from hpcllm.schema import COUNT, Nullable, Opt, validate

#: the ``format`` field of an exported single-file model
EXPORT_FORMAT = "hpcllm-model"
EXPORT_VERSION = 1


@dataclass
class SampleConfig:
    """How to draw tokens from the model's distribution."""

    max_new_tokens: int = 200
    """Number of tokens to generate after the prompt."""
    temperature: float = 0.8
    """Divides the logits before the softmax; 0 means greedy (argmax) decoding."""
    top_k: int | None = 50
    """Sample only among the k most likely tokens (None or 0: all tokens; 1: greedy)."""
    seed: int = 0
    """Seed of the sampling generator: the same seed gives the same text."""
    stop_at_eod: bool = True
    """Stop when the model emits the end-of-document token."""
    top_p: float | None = None
    """Nucleus sampling: only the most likely tokens whose probabilities sum to ``top_p``
    (None or 1: all; applied after ``top_k``)."""
    stop: str | None = None
    """Cut the completion before the first occurrence of this string."""
    kv_cache: bool = True
    """Decode incrementally with a key/value cache (False: recompute the whole context for
    every token, the reference path)."""


@dataclass
class LoadedModel:
    """A model ready for sampling, with the tokenizer it was trained with."""

    model: torch.nn.Module
    tokenizer: Any
    model_config: dict
    source: str
    step: int | None = None
    quantization: str | None = None
    """None (the trained weights) or :data:`hpcllm.infer.quantize.METHOD`."""

    @property
    def seq_len(self) -> int:
        return int(self.model_config["seq_len"])


# --------------------------------------------------------------------------- locating


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """Return the checkpoint directory or export file that ``path`` designates."""
    p = Path(path)
    if not p.exists():
        raise HpcllmError(f"{p}: no such checkpoint, run directory or exported model")
    if p.is_file():
        return p
    if _is_checkpoint_dir(p):
        return p
    ckpts = p / "checkpoints"
    if ckpts.is_dir():
        latest = ckpts / "latest"
        if latest.exists():
            # `latest` is a symlink or a small text file holding the directory name
            target = latest.resolve() if latest.is_symlink() else ckpts / latest.read_text().strip()
            if _is_checkpoint_dir(target):
                return target
            raise HpcllmError(f"{latest}: points to {target.name}, which is not a complete checkpoint")
        steps = sorted(d for d in ckpts.glob("step-*") if not d.name.endswith(".tmp") and _is_checkpoint_dir(d))
        if steps:
            return steps[-1]
        raise HpcllmError(f"{ckpts}: no complete checkpoint (step-*/ with model files and config.json)")
    raise HpcllmError(
        f"{p}: not a run directory (no checkpoints/), a checkpoint directory (no model files) "
        "or an exported model file"
    )


def _is_checkpoint_dir(d: Path) -> bool:
    from hpcllm.train.checkpoint import has_model_files

    return d.is_dir() and (d / "config.json").is_file() and has_model_files(d)


# --------------------------------------------------------------------------- reading


def _read_json(path: Path) -> dict:
    """A checkpoint's JSON file; generation needs only some of its fields (checked where used)."""
    from hpcllm.train.checkpoint import load_json

    return load_json(path, schema={"step": Opt(Nullable(COUNT)), "tokenizer_sha256": Opt(Nullable(str))}
                     if path.name == "trainer.json" else dict)


def _model_config_of(config: dict, where: Path, vocab_size: int | None = None) -> dict:
    """The GPTConfig fields inside a run's config.json (hpcllm.config.effective_config puts
    the resolved GPTConfig under ``model``; the preset options under ``model_options``)."""
    def resolved(d):
        return isinstance(d, dict) and isinstance(d.get("n_layer"), int) and isinstance(d.get("vocab_size"), int)

    for key in ("model", "gpt", "model_config"):
        if resolved(config.get(key)):
            return dict(config[key])
    if resolved(config):
        return dict(config)
    # only the preset section: resolve it the way `hpcllm train` does
    opts = config.get("model_options") or config.get("model")
    if isinstance(opts, dict) and isinstance(opts.get("model"), str) and vocab_size is not None:
        from hpcllm.config import ModelConfig, resolve_model

        known = {k: v for k, v in opts.items() if k in ModelConfig.__dataclass_fields__}
        return resolve_model(ModelConfig(**known), vocab_size).to_dict()
    raise HpcllmError(f"{where}: no model configuration (expected a 'model' section with n_layer, n_head, ...)")


def _data_dir_of(config: dict) -> str | None:
    # `data_dir` is the absolute path the trainer records; data.path is the flag as given
    for key in ("data_dir", "data_path"):
        if isinstance(config.get(key), str):
            return config[key]
    data = config.get("data")
    if isinstance(data, str):
        return data
    if isinstance(data, dict):
        for key in ("path", "data", "dir", "data_dir"):
            if isinstance(data.get(key), str):
                return data[key]
    return None


def _recorded_sha(*sources: dict) -> str | None:
    for src in sources:
        if not isinstance(src, dict):
            continue
        for key in ("tokenizer_sha256",):
            if isinstance(src.get(key), str):
                return src[key]
        tok = src.get("tokenizer")
        if isinstance(tok, dict) and isinstance(tok.get("sha256"), str):
            return tok["sha256"]
        data = src.get("data")
        if isinstance(data, dict) and isinstance(data.get("tokenizer_sha256"), str):
            return data["tokenizer_sha256"]
    return None


def _merge_state_dicts(ckpt: Path) -> dict:
    """The whole model's tensors from a checkpoint of any layout (by parameter name)."""
    from hpcllm.train.checkpoint import CheckpointReader

    return CheckpointReader(ckpt).model_state()


def _tokenizer_from_json_text(text: str) -> Any:
    from hpcllm.data.tokenizer import load_tokenizer

    # load_tokenizer takes a path; the export carries the file's bytes
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "tokenizer.json"
        p.write_text(text, encoding="utf-8")
        return load_tokenizer(str(p))


def _load_checkpoint_tokenizer(ckpt: Path, config: dict, trainer: dict) -> Any:
    from hpcllm.data.tokenizer import load_tokenizer, tokenizer_from_dataset

    want = _recorded_sha(trainer, config)
    copy = ckpt / "tokenizer.json"
    byte = load_tokenizer("byte")
    if copy.is_file():
        tok, where = load_tokenizer(str(copy)), str(copy)
    elif want is not None and want == byte.sha256:
        tok, where = byte, "byte"  # needs no file: the dataset may have moved since training
    else:
        data_dir = _data_dir_of(config)
        if data_dir is None:
            if config.get("tokenizer") in (None, "byte") or (isinstance(config.get("tokenizer"), dict)
                                                               and config["tokenizer"].get("type") == "byte"):
                tok, where = load_tokenizer("byte"), "byte"
            else:
                raise HpcllmError(f"{ckpt / 'config.json'}: names no dataset directory to find the tokenizer in")
        else:
            if not Path(data_dir).is_dir():
                # a relative --data was relative to where training started: try next to the run
                for base in (ckpt.parent.parent.parent, ckpt.parent.parent):
                    if (base / data_dir).is_dir():
                        data_dir = str(base / data_dir)
                        break
            if not Path(data_dir).is_dir():
                raise HpcllmError(
                    f"{ckpt / 'config.json'}: dataset directory {data_dir} (which holds the tokenizer) does not exist"
                )
            where = data_dir
            try:
                tok = tokenizer_from_dataset(data_dir)
            except HpcllmError as e:
                raise HpcllmError(f"tokenizer of {ckpt}: {e}") from None
            except (FileNotFoundError, OSError) as e:
                raise HpcllmError(f"{data_dir}: tokenizer file missing ({e.filename or e})") from None
    if want is not None and tok.sha256 != want:
        raise HpcllmError(
            f"{where}: tokenizer sha256 {tok.sha256[:12]}… differs from the {want[:12]}… recorded in {ckpt} "
            "(the dataset's tokenizer changed since training)"
        )
    return tok


def _gpt_config(model_config: dict, where: Path):
    """The GPTConfig of a checkpoint's or export's model section, checked (one line otherwise)."""
    from hpcllm.model.gpt import GPTConfig
    from hpcllm.train.checkpoint import CONFIG_SCHEMA

    validate(model_config, CONFIG_SCHEMA["model"], str(where), "model")
    try:
        return GPTConfig(**model_config)
    except (TypeError, ValueError) as e:
        raise HpcllmError(f"{where}: model configuration does not match this hpcllm version: {e}") from None


def _build_model(model_config: dict, state: dict, where: Path) -> torch.nn.Module:
    from hpcllm.model.gpt import GPT

    cfg = _gpt_config(model_config, where)
    # the shapes first, on the meta device (no memory): a damaged config cannot allocate
    with torch.device("meta"):
        ref = GPT(cfg, init_seed=None).state_dict()
    state = {k.removeprefix("module."): v for k, v in state.items()}
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(ref[k].shape)}" for k, v in state.items()
             if k in ref and torch.is_tensor(v) and v.shape != ref[k].shape]
    if wrong:
        raise HpcllmError(f"{where}: weights do not fit the model configuration ({'; '.join(wrong[:2])})")
    model = GPT(cfg)
    # training may have saved bf16/fp16 tensors; sampling runs in the model's own dtype
    state = {k: (v.to(ref[k].dtype) if k in ref and torch.is_tensor(v) else v) for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    # the tied head may be stored only once under either name
    missing = [m for m in missing if not m.endswith("lm_head.weight")]
    if missing or unexpected:
        raise HpcllmError(
            f"{where}: weights do not fit the model configuration "
            f"(missing {missing[:3]}{'…' if len(missing) > 3 else ''}, unexpected {unexpected[:3]})"
        )
    return model


def _build_quantized_model(model_config: dict, state: dict, where: Path) -> torch.nn.Module:
    """The INT8 model of an ``export --int8`` file: built on the meta device, quantized (shapes
    only) and then given the file's tensors, so the fp32 weights never exist in memory."""
    from hpcllm.infer import quantize
    from hpcllm.model.gpt import GPT

    cfg = _gpt_config(model_config, where)
    with torch.device("meta"):
        model = quantize.quantize_int8(GPT(cfg, init_seed=None))
    ref = quantize.quantized_state_dict(model)
    missing = sorted(set(ref) - set(state))
    unexpected = sorted(set(state) - set(ref))
    wrong = [f"{k} {tuple(v.shape)} {v.dtype} vs {tuple(ref[k].shape)} {ref[k].dtype}" for k, v in state.items()
             if k in ref and (v.shape != ref[k].shape or v.dtype != ref[k].dtype)]
    if missing or unexpected or wrong:
        raise HpcllmError(f"{where}: INT8 weights do not fit the model configuration (missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}, mismatched {wrong[:2]})")
    model.load_state_dict(state, strict=False, assign=True)
    quantize.tie_head(model)
    return model


def load_model(path: str | os.PathLike, device: str = "cpu", int8: bool = False) -> LoadedModel:
    """Load a model and its tokenizer from a run dir, checkpoint dir or exported file;
    ``int8``: quantize its weights (an INT8 export is quantized whatever ``int8`` says)."""
    from hpcllm.infer import quantize

    src = resolve_checkpoint(path)
    step = None
    quantization = None
    if src.is_file():
        from hpcllm.train.checkpoint import load_torch

        payload = load_torch(src)
        if not isinstance(payload, dict) or payload.get("format") not in (EXPORT_FORMAT, None) or "model" not in payload:
            raise HpcllmError(f"{src}: not an hpcllm exported model (no 'model'/'config' entries)")
        validate(payload, EXPORT_SCHEMA, str(src))
        _check_tensors(payload["model"], src, "model")
        model_config = dict(payload["config"])
        tinfo = payload.get("tokenizer") or {"type": "byte"}
        if tinfo.get("type") == "byte" or not tinfo.get("json"):
            from hpcllm.data.tokenizer import load_tokenizer

            tok = load_tokenizer("byte")
        else:
            tok = _tokenizer_from_json_text(tinfo["json"])
        if tinfo.get("sha256") and tok.sha256 != tinfo["sha256"]:
            raise HpcllmError(f"{src}: embedded tokenizer sha256 {tok.sha256[:12]}… differs from the recorded "
                              f"{tinfo['sha256'][:12]}…")
        state = payload["model"]
        step = payload.get("step")
        quantization = payload.get("quantization")
        if quantization not in (None, quantize.METHOD):
            raise HpcllmError(f"{src}: quantization {quantization!r} is not one this hpcllm version reads "
                              f"(only {quantize.METHOD!r})")
    else:
        config = _read_json(src / "config.json")
        trainer = _read_json(src / "trainer.json") if (src / "trainer.json").is_file() else {}
        tok = _load_checkpoint_tokenizer(src, config, trainer)
        model_config = _model_config_of(config, src / "config.json", tok.vocab_size)
        state = _merge_state_dicts(src)
        step = trainer.get("step")
    if quantization is not None:
        model = _build_quantized_model(model_config, state, src)
    else:
        model = _build_model(model_config, state, src)
        if int8:
            quantize.quantize_int8(model)
            quantization = quantize.METHOD
    model_vocab = int(model_config.get("vocab_size", tok.vocab_size))
    if tok.vocab_size > model_vocab:
        raise HpcllmError(f"{src}: tokenizer has {tok.vocab_size} tokens but the model only {model_vocab}")
    dev = _device(device)
    model.to(dev).eval()
    return LoadedModel(model=model, tokenizer=tok, model_config=model_config, source=str(src), step=step,
                       quantization=quantization)


def _device(device: str) -> torch.device:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise HpcllmError(f"--device {device}: CUDA is not available on this machine")
    try:
        return torch.device(device)
    except RuntimeError as e:
        raise HpcllmError(f"--device {device}: {e}") from None


# --------------------------------------------------------------------------- sampling


def model_device(model: torch.nn.Module) -> torch.device:
    """Where the model's tensors are (parameters, or buffers: a quantized model's weights)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def truncate_prompt(ids: list[int], seq_len: int) -> tuple[list[int], int]:
    """The prompt's last ``seq_len`` tokens (the most the model attends to) and the number
    of tokens dropped from its start."""
    dropped = max(0, len(ids) - seq_len)
    return (list(ids[dropped:]), dropped)


def _logits(model: torch.nn.Module, idx: torch.Tensor) -> torch.Tensor:
    out = model(idx)
    if isinstance(out, (tuple, list)):
        out = out[0]
    return out


def last_logits(model: torch.nn.Module, idx: torch.Tensor, kv=None, positions=None) -> torch.Tensor:
    """(B, vocab) logits of the last position of ``idx``, which is all sampling reads.

    A whole hpcllm GPT runs its pieces (``embed``, ``run_blocks``, ``logits``) as its
    ``forward`` does, but the head only on the last position: the head is the largest
    matmul, and over a 128-token prompt of the 124M shape computing it for every position is
    a third of the prompt's FLOPs (and the no-cache path pays it for every new token). Any
    other module: its full forward, last position taken.
    """
    from hpcllm.model.gpt import GPT

    if not (isinstance(model, GPT) and model.has_embed and model.has_head):
        out = _logits(model, idx) if kv is None else model(idx, kv=kv, positions=positions)
        return out[:, -1]
    x = model.embed(idx, kv.pos if kv is not None else 0, positions)
    x = model.run_blocks(x, kv, positions)
    if kv is not None:
        kv.pos += idx.size(1)
    return model.logits(x[:, -1:])[:, 0]


def next_token_distribution(logits: torch.Tensor, vocab_size: int, temperature: float,
                            top_k: int | None, top_p: float | None = None) -> torch.Tensor | None:
    """Probabilities (1-D, float32) for the next token from the last position's logits.

    Returns None for greedy decoding (temperature 0 or top-k 1): the caller takes the argmax.
    Ids past ``vocab_size`` (padding of the embedding) get probability 0.
    """
    logits = logits[..., :vocab_size].float()
    if temperature <= 0 or top_k == 1:
        return None
    logits = logits / temperature
    if top_k and top_k < vocab_size:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None and 0 < top_p < 1:
        sorted_p, order = torch.sort(probs, descending=True)
        # keep a token while the mass before it is below top_p (the most likely one always)
        drop = (torch.cumsum(sorted_p, dim=-1) - sorted_p) >= top_p
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


@torch.no_grad()
def generate_ids(model: torch.nn.Module, prompt_ids: list[int], sample: SampleConfig, *, seq_len: int,
                 vocab_size: int, eod_id: int | None = None) -> list[int]:
    """Extend ``prompt_ids`` by up to ``sample.max_new_tokens`` tokens; returns only the new ids.

    A prompt longer than ``seq_len`` is truncated from the left (:func:`truncate_prompt`; the
    CLI says how many tokens were dropped); later the context keeps the last ``seq_len`` tokens
    (the model has no positions beyond).
    With ``sample.kv_cache`` the prompt is encoded once and each new token costs one position's
    forward pass; once the context exceeds ``seq_len`` every step re-encodes the last
    ``seq_len`` tokens, which is what the model sees without a cache.
    """
    if sample.temperature < 0:
        raise HpcllmError(f"--temperature {sample.temperature}: must be >= 0")
    if sample.top_k is not None and sample.top_k < 0:
        raise HpcllmError(f"--top-k {sample.top_k}: must be >= 0")
    if sample.top_p is not None and not 0 < sample.top_p <= 1:
        raise HpcllmError(f"--top-p {sample.top_p}: must be in (0, 1]")
    device = model_device(model)
    # the generator lives on the CPU so a seed gives the same text on CPU and GPU
    gen = torch.Generator(device="cpu").manual_seed(sample.seed)
    prompt_ids = truncate_prompt(prompt_ids, seq_len)[0] if prompt_ids else prompt_ids
    ids = list(prompt_ids) if prompt_ids else ([eod_id] if eod_id is not None else [0])
    start = len(ids) if prompt_ids else 0
    was_training = model.training
    model.eval()
    cache = model.new_kv_cache(1, seq_len) if sample.kv_cache and hasattr(model, "new_kv_cache") else None
    try:
        for _ in range(sample.max_new_tokens):
            if cache is None:
                ctx = torch.tensor([ids[-seq_len:]], dtype=torch.long, device=device)
                last = last_logits(model, ctx)[0].cpu()
            else:
                if cache.pos == 0 or cache.pos >= seq_len:
                    # first step, or the window is full: (re)fill the cache with the last
                    # seq_len tokens (positions restart at 0, as the recomputing path sees them)
                    cache.reset()
                    new = ids[-seq_len:]
                else:
                    new = ids[-1:]
                last = last_logits(model, torch.tensor([new], dtype=torch.long, device=device), cache)[0].cpu()
            probs = next_token_distribution(last, vocab_size, sample.temperature, sample.top_k, sample.top_p)
            nxt = int(torch.argmax(last[:vocab_size])) if probs is None else int(torch.multinomial(probs, 1, generator=gen))
            ids.append(nxt)
            if sample.stop_at_eod and eod_id is not None and nxt == eod_id:
                break
    finally:
        model.train(was_training)
    return ids[start:] if prompt_ids else ids[1:]


@torch.no_grad()
def generate_batch(model: torch.nn.Module, prompts: list[list[int]], sample: SampleConfig, *, seq_len: int,
                   vocab_size: int, eod_id: int | None = None, batch_size: int = 8) -> list[list[int]]:
    """New ids for each of ``prompts``, ``batch_size`` at a time: left-padded to the batch's
    longest prompt (padding positions are never attended to; each row's positions start at its
    first real token), one KV-cached forward pass per new token for the whole batch. Each row
    samples from its own generator seeded with ``sample.seed``, so a prompt's output does not
    depend on its batch. A batch whose longest prompt plus ``max_new_tokens`` exceeds
    ``seq_len`` (the sliding window) is generated prompt by prompt."""
    if batch_size < 1:
        raise HpcllmError(f"--batch-size {batch_size}: must be >= 1")
    out: list = [None] * len(prompts)
    device = model_device(model)
    # the model attends to seq_len tokens at most: longer prompts lose their start
    prompts = [truncate_prompt(p, seq_len)[0] for p in prompts]
    start_tok = eod_id if eod_id is not None else 0
    was_training = model.training
    model.eval()
    try:
        for b0 in range(0, len(prompts), batch_size):
            idx = list(range(b0, min(b0 + batch_size, len(prompts))))
            rows = [list(prompts[i]) or [start_tok] for i in idx]
            longest = max(len(r) for r in rows)
            if (longest + sample.max_new_tokens > seq_len or not sample.kv_cache
                    or not hasattr(model, "new_kv_cache")):
                for i in idx:
                    out[i] = generate_ids(model, prompts[i], sample, seq_len=seq_len, vocab_size=vocab_size,
                                          eod_id=eod_id)
                continue
            pads = [longest - len(r) for r in rows]
            tokens = torch.tensor([[start_tok] * p + r for p, r in zip(pads, rows)], dtype=torch.long, device=device)
            positions = torch.tensor([[max(0, j - p) for j in range(longest)] for p in pads], device=device)
            cache = model.new_kv_cache(len(rows), seq_len)
            for r, p in enumerate(pads):
                cache.valid[r, :p] = False
            logits = last_logits(model, tokens, cache, positions).cpu()
            gens = [torch.Generator(device="cpu").manual_seed(sample.seed) for _ in rows]
            new: list[list[int]] = [[] for _ in rows]
            done = [False] * len(rows)
            for step in range(sample.max_new_tokens):
                for r in range(len(rows)):
                    if done[r]:
                        continue
                    probs = next_token_distribution(logits[r], vocab_size, sample.temperature, sample.top_k,
                                                    sample.top_p)
                    nxt = (int(torch.argmax(logits[r, :vocab_size])) if probs is None
                           else int(torch.multinomial(probs, 1, generator=gens[r])))
                    new[r].append(nxt)
                    done[r] = (sample.stop_at_eod and eod_id is not None and nxt == eod_id)
                if all(done) or step == sample.max_new_tokens - 1:
                    break
                feed = torch.tensor([[rw[-1] if rw else start_tok] for rw in new], dtype=torch.long, device=device)
                pos = torch.tensor([[len(r) + step] for r in rows], device=device)
                logits = last_logits(model, feed, cache, pos).cpu()
            for i, rw in zip(idx, new):
                out[i] = rw
    finally:
        model.train(was_training)
    return out


def read_prompts(path) -> list[str]:
    """Prompts of a ``--prompts-file``: JSONL (each line an object with "prompt" or "text", or a
    JSON string) when the file ends in .jsonl, else one prompt per line (blank lines skipped)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise HpcllmError(f"--prompts-file {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise HpcllmError(f"--prompts-file {path}: unreadable ({excerpt(e)})") from None
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if p.suffix != ".jsonl":
            out.append(line)
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise HpcllmError(f"{path}:{n}: invalid JSON: {e.msg}") from None
        if isinstance(obj, dict) and isinstance(obj.get("prompt", obj.get("text")), str):
            out.append(obj.get("prompt", obj.get("text")))
        elif isinstance(obj, str):
            out.append(obj)
        else:
            raise HpcllmError(f"{path}:{n}: expected a JSON string or an object with a \"prompt\" string")
    if not out:
        raise HpcllmError(f"--prompts-file {path}: no prompts")
    return out


#: what loading an exported file relies on
EXPORT_SCHEMA = {"config": dict, "model": dict, "step": Opt(Nullable(COUNT)), "quantization": Opt(Nullable(str)),
                 "tokenizer": Opt(Nullable({"type": Opt(str), "json": Opt(Nullable(str)), "sha256": Opt(Nullable(str))}))}


def _check_tensors(d: dict, where, field: str) -> None:
    bad = next((k for k, v in d.items() if not isinstance(k, str) or not torch.is_tensor(v)), None)
    if bad is not None:
        raise HpcllmError(f"{where}: field '{field}.{bad}' must be a tensor")


def valid_prompt(prompt: str) -> tuple[str, str | None]:
    """The prompt as valid Unicode, and a note when it was not: bytes that are not UTF-8 (a
    shell passes them through as lone surrogates) become U+FFFD, the replacement character,
    as the tokenizers decode invalid bytes."""
    try:
        prompt.encode("utf-8")
        return prompt, None
    except UnicodeEncodeError as e:
        raw = prompt.encode("utf-8", "surrogateescape")
        bad = raw[e.start:e.start + 1].hex() if e.start < len(raw) else "?"
        fixed = raw.decode("utf-8", "replace")
        n = fixed.count("\ufffd") - prompt.count("\ufffd")
        return fixed, (f"--prompt is not valid UTF-8 (byte 0x{bad} at character {e.start}); "
                       f"{n} invalid byte{'s' if n != 1 else ''} replaced with U+FFFD")


def generate_text(loaded: LoadedModel, prompt: str, sample: SampleConfig) -> str:
    """The completion of ``prompt`` (without the prompt), decoded; the EOD token is dropped."""
    return complete(loaded, prompt, sample)["completion"]


def complete(loaded: LoadedModel, prompt: str, sample: SampleConfig) -> dict:
    """``{"completion": text, "tokens": new ids, "prompt_tokens_dropped": n}`` for ``prompt``
    (n > 0: the prompt was longer than seq_len and lost its first n tokens)."""
    tok = loaded.tokenizer
    ids = tok.encode(valid_prompt(prompt)[0])
    dropped = truncate_prompt(ids, loaded.seq_len)[1]
    new = generate_ids(loaded.model, ids, sample, seq_len=loaded.seq_len, vocab_size=tok.vocab_size,
                       eod_id=tok.eod_id)
    return finish(loaded, new, sample, dropped)


def finish(loaded: LoadedModel, new: list[int], sample: SampleConfig, dropped: int = 0) -> dict:
    """The decoded completion of new ids ``new`` (EOD dropped, cut at the stop string)."""
    tok = loaded.tokenizer
    if new and sample.stop_at_eod and new[-1] == tok.eod_id:
        new = new[:-1]
    return {"completion": cut_at_stop(tok.decode(new), sample.stop), "tokens": len(new),
            "prompt_tokens_dropped": dropped}


def truncation_note(dropped: int, prompt_tokens: int, seq_len: int, which: str = "the prompt") -> str:
    return (f"{which} has {prompt_tokens} tokens, more than the model's seq_len {seq_len}: "
            f"its first {dropped} token{'s' if dropped != 1 else ''} were dropped")


def cut_at_stop(text: str, stop: str | None) -> str:
    """``text`` up to (without) the first ``stop`` string."""
    if stop:
        i = text.find(stop)
        if i >= 0:
            return text[:i]
    return text


def generate(checkpoint: str | os.PathLike, prompt: str, sample: SampleConfig | None = None,
             device: str = "cpu", int8: bool = False) -> str:
    """Load ``checkpoint`` and return the sampled completion of ``prompt``."""
    return generate_text(load_model(checkpoint, device=device, int8=int8), prompt, sample or SampleConfig())


# --------------------------------------------------------------------------- export


def export_payload(checkpoint: str | os.PathLike, int8: bool = False) -> dict:
    """The single-file form of a checkpoint: config, fp32 state dict and the tokenizer itself;
    ``int8``: the quantized state (each tensor once) and ``quantization`` naming the method."""
    from hpcllm.infer.quantize import quantized_state_dict

    loaded = load_model(checkpoint, device="cpu", int8=int8)
    tok = loaded.tokenizer
    tok_json = None
    if getattr(tok, "type", "byte") != "byte":
        tok_json = _tokenizer_json_text(tok, Path(loaded.source))
    state = quantized_state_dict(loaded.model) if loaded.quantization else loaded.model.state_dict()
    payload = {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "config": loaded.model_config,
        "model": {k: v.detach().cpu() for k, v in state.items()},
        "tokenizer": {"type": tok.type, "vocab_size": tok.vocab_size, "eod_id": tok.eod_id,
                      "sha256": tok.sha256, "json": tok_json},
        "step": loaded.step,
    }
    if loaded.quantization:  # absent from fp32 files, so they stay what older versions wrote
        payload["quantization"] = loaded.quantization
    return payload


def _tokenizer_json_text(tok: Any, ckpt: Path) -> str:
    # the file's exact bytes, so the embedded copy hashes to the recorded sha256
    path = getattr(tok, "path", None)
    if path and Path(path).is_file():
        return Path(path).read_bytes().decode("utf-8")
    raise HpcllmError(f"{ckpt}: the BPE tokenizer's file is gone; cannot embed it in the export")


def save_export(checkpoint: str | os.PathLike, out: str | os.PathLike, int8: bool = False) -> Path:
    """Write :func:`export_payload` to ``out`` atomically."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from hpcllm.fileio import remove_stale_tmp

    remove_stale_tmp(out)  # a killed export's half-written file
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    payload = export_payload(checkpoint, int8=int8)
    from hpcllm.fileio import write_error
    from hpcllm.train.checkpoint import save_torch

    try:
        save_torch(payload, tmp)
        os.replace(tmp, out)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise write_error("the exported model", out, e) from None
    return out
