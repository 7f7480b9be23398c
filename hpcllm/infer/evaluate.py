"""Perplexity of a trained model over a whole dataset split (``hpcllm eval``).

The split's tokens (its shards concatenated in manifest order, as training's evaluation
reads them) are cut into the loader's non-overlapping windows of ``seq_len + 1`` tokens
starting every ``seq_len`` tokens; every window is scored exactly once, in order, and each
of its ``seq_len`` targets counts once. Reported:

- ``loss``: mean next-token negative log-likelihood in nats, the softmax over the model's
  whole (padded) head as in training's validation loss;
- ``perplexity``: ``exp(loss)``;
- ``bits_per_byte``: the summed NLL in bits over the UTF-8 bytes the targets decode to
  (:func:`token_bytes`; the end-of-document token is 0 bytes), which compares models with
  different tokenizers: ``loss / ln 2 * tokens / bytes``.

Under ``mpirun``/``srun`` with several ranks, rank r scores the contiguous block r of the
windows (:func:`rank_windows`) and the sums (float64) are added with one mpi4py allreduce;
one process needs no MPI at all.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from hpcllm.errors import HpcllmError

# the GPT-2 byte-level alphabet: byte b is shown as character _BYTE_CHARS[b] in token strings
_PRINTABLE = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
_BYTE_CHARS = {}
_n = 0
for _b in range(256):
    if _b in _PRINTABLE:
        _BYTE_CHARS[chr(_b)] = _b
    else:
        _BYTE_CHARS[chr(256 + _n)] = _b
        _n += 1
_BYTE_FALLBACK = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def token_bytes(tok, n: int) -> np.ndarray:
    """UTF-8 bytes each id < ``n`` stands for (int64): the byte tokenizer's ids 0-255 one
    each; a byte-level BPE token as many as its characters (each is one byte); a
    SentencePiece-style token its text's (``▁`` a space, ``<0xNN>`` one byte); the EOD token,
    other special tokens and ids past the vocabulary (padding) 0."""
    out = np.zeros(n, dtype=np.int64)
    if tok.type == "byte":
        out[:min(n, 256)] = 1
        return out
    inner = tok._tok  # the tokenizers.Tokenizer behind hpcllm's wrapper
    special = {int(i) for i, t in (getattr(inner, "get_added_tokens_decoder", dict)() or {}).items()
               if getattr(t, "special", True)}
    for i in range(min(n, tok.vocab_size)):
        s = inner.id_to_token(i)
        if s is None or i in special or i == tok.eod_id:
            continue
        if all(c in _BYTE_CHARS for c in s):
            out[i] = len(s)
        elif _BYTE_FALLBACK.fullmatch(s):
            out[i] = 1
        else:
            out[i] = len(s.replace("\u2581", " ").encode("utf-8"))
    return out


def rank_windows(n: int, rank: int, world: int) -> range:
    """Rank ``rank``'s contiguous block of windows 0..n-1 (the blocks cover them exactly once)."""
    return range(rank * n // world, (rank + 1) * n // world)


def check_tokenizer(loaded, data_dir) -> None:
    """The dataset must be tokenized with the model's tokenizer (same sha256 as load_model checks)."""
    from hpcllm.data.loader import DatasetInfo

    info = DatasetInfo(str(data_dir))
    if info.tokenizer_sha256 != loaded.tokenizer.sha256:
        raise HpcllmError(
            f"{Path(data_dir) / 'manifest.json'}: tokenizer sha256 {info.tokenizer_sha256[:12]}… ({info.tokenizer_type}) "
            f"differs from the model's {loaded.tokenizer.sha256[:12]}… ({loaded.tokenizer.type}, {loaded.source}); "
            "evaluate on a dataset preprocessed with the model's tokenizer")
    info.check_vocab(int(loaded.model_config.get("vocab_size", loaded.tokenizer.vocab_size)))


@torch.no_grad()
def evaluate(loaded, data_dir, split: str = "val", batch_size: int = 8, rank: int = 0, world: int = 1,
             allreduce=None) -> dict:
    """Loss, perplexity and bits per byte of ``loaded`` (a :class:`~hpcllm.infer.generate.LoadedModel`)
    over every window of ``split``: ``dict(loss, perplexity, bits_per_byte, tokens, windows, bytes)``.

    ``rank``/``world``: score only this rank's block of windows; ``allreduce`` (a function of a
    float64 array returning the elementwise sum over the ranks) makes the result the whole split's.
    """
    from hpcllm.data.loader import DatasetInfo, TokenStream
    from hpcllm.infer.generate import model_device

    if batch_size < 1:
        raise HpcllmError(f"--batch-size {batch_size}: must be >= 1")
    check_tokenizer(loaded, data_dir)
    info = DatasetInfo(str(data_dir))
    if split not in info.manifest["splits"]:
        raise HpcllmError(f"{Path(data_dir) / 'manifest.json'}: no split {split!r} "
                          f"(has {', '.join(sorted(info.manifest['splits']))})")
    seq_len = loaded.seq_len
    stream = TokenStream(str(data_dir), info.manifest["splits"][split]["shards"])
    n = stream.windows(seq_len)
    if n == 0:
        raise HpcllmError(f"{data_dir}: the {split} split has {stream.total} tokens, fewer than one window of "
                          f"seq_len+1 = {seq_len + 1} tokens")
    model = loaded.model
    model.eval()
    device = model_device(model)
    nbytes = torch.from_numpy(token_bytes(loaded.tokenizer, int(model.cfg.padded_vocab)
                                          if hasattr(model, "cfg") else loaded.tokenizer.vocab_size + 1))
    # [nll, tokens, bytes, windows], float64 so any split of the windows sums alike
    sums = np.zeros(4, dtype=np.float64)
    mine = rank_windows(n, rank, world)
    for b0 in range(mine.start, mine.stop, batch_size):
        idx = np.arange(b0, min(b0 + batch_size, mine.stop), dtype=np.int64)
        t = torch.from_numpy(stream.read_windows(idx, seq_len))
        x, y = t[:, :-1].to(device), t[:, 1:]
        logits = model(x)
        # row by row: the log-softmax temporary is one window's, not the batch's
        nll = sum(float(F.cross_entropy(logits[r].float(), y[r].to(device), reduction="sum").double())
                  for r in range(len(idx)))
        sums += (nll, y.numel(), float(nbytes[y].sum()), len(idx))
    if allreduce is not None:
        sums = np.asarray(allreduce(sums), dtype=np.float64)
    total, tokens, nb, windows = sums.tolist()
    loss = total / tokens
    return {"loss": loss, "perplexity": math.exp(loss),
            "bits_per_byte": total / math.log(2) / nb if nb else None,
            "tokens": int(tokens), "windows": int(windows), "bytes": int(nb)}


# --------------------------------------------------------------------------- ranks


def launched_world_size(env=None) -> int:
    """Ranks the launcher started (1 outside mpirun/srun), read from its environment so a
    single process never imports MPI."""
    env = os.environ if env is None else env
    for key in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE"):
        if env.get(key, "").isdigit():
            return int(env[key])
    if "SLURM_STEP_ID" in env and "SLURM_PROCID" in env:
        return int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or 1)
    return 1


class Ranks:
    """This process's rank, the world size and a float64 sum over the ranks (mpi4py when
    launched with several ranks; identities for one process)."""

    def __init__(self):
        self.rank, self.size, self.local_rank, self.local_size, self.comm = 0, 1, 0, 1, None
        if launched_world_size() > 1:
            from mpi4py import MPI

            self.comm = MPI.COMM_WORLD
            self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
            local = self.comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
            self.local_rank, self.local_size = local.Get_rank(), local.Get_size()
            local.Free()

    def allreduce(self, values: np.ndarray) -> np.ndarray:
        if self.comm is None:
            return values
        from mpi4py import MPI

        out = np.empty_like(values)
        self.comm.Allreduce(np.ascontiguousarray(values), out, op=MPI.SUM)
        return out

    def device(self, device: str) -> str:
        """``cuda`` becomes this rank's GPU on the node (local rank modulo the GPUs seen)."""
        if device == "cuda" and self.size > 1 and torch.cuda.is_available():
            return f"cuda:{self.local_rank % torch.cuda.device_count()}"
        return device

    def share_cores(self) -> None:
        """Ranks on one node split its cores unless OMP_NUM_THREADS says otherwise."""
        if self.local_size > 1 and "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // self.local_size))


def evaluate_source(source, data_dir, split: str = "val", batch_size: int = 8, device: str = "cpu",
                    int8: bool = False, ranks: Ranks | None = None) -> dict:
    """Load ``source`` (run dir, checkpoint dir or exported file) and evaluate it; with
    ``int8`` also its INT8 quantization. ``{"source", "data", "split", "seq_len",
    "results": {label: evaluate(...)}}``, labels ``fp32`` (or the loaded quantization:
    ``int8``) then ``int8``, and ``int8_perplexity_change`` (relative) with both."""
    from hpcllm.infer.generate import load_model
    from hpcllm.infer.quantize import METHOD, is_quantized, quantize_int8

    ranks = ranks or Ranks()
    loaded = load_model(source, device=ranks.device(device))
    check_tokenizer(loaded, data_dir)  # before any work: a mismatch is one line, on every rank alike
    run = lambda: evaluate(loaded, data_dir, split, batch_size, ranks.rank, ranks.size, ranks.allreduce)  # noqa: E731
    results = {}
    if is_quantized(loaded.model):
        results["int8"] = run()
    else:
        results[_dtype_label(loaded.model)] = run()
        if int8:
            quantize_int8(loaded.model)
            loaded.quantization = METHOD
            results["int8"] = run()
    out = {"source": loaded.source, "data": str(data_dir), "split": split, "seq_len": loaded.seq_len,
           "results": results}
    if len(results) == 2:
        base, q = (r["perplexity"] for r in results.values())
        out["int8_perplexity_change"] = q / base - 1
    return out


def _dtype_label(model) -> str:
    dtype = next((p.dtype for p in model.parameters()), torch.float32)
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))
