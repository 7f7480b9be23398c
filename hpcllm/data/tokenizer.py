"""Tokenizers behind one interface: the built-in byte tokenizer and HF `tokenizers` BPE.

Every tokenizer object has ``encode(str) -> list[int]``, ``encode_batch(list[str])``,
``encode_batch_np(list[str]) -> list[np.ndarray]`` (the fast path preprocess uses),
``decode(ids) -> str``, ``vocab_size``, ``eod_id``, ``type`` ("byte" | "bpe"), ``sha256`` and
``path`` (the tokenizer.json, None for the byte tokenizer).

Everything is offline: the byte tokenizer needs no files, BPE tokenizers are trained locally
(:func:`train_bpe`) or loaded from a ``tokenizer.json``.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Iterable, Iterator, Sequence

import numpy as np

from hpcllm.errors import HpcllmError, excerpt

#: the end-of-document token of every hpcllm tokenizer
EOD_TOKEN = "<|endoftext|>"
#: end-of-document tokens of other families' tokenizers (Llama 3, Llama 2 / Mistral, Gemma),
#: tried in this order when a tokenizer.json has no EOD_TOKEN and names no eos token
OTHER_EOD_TOKENS = ("<|end_of_text|>", "</s>", "<eos>")


class ByteTokenizer:
    """ids 0-255 are the UTF-8 bytes of the text, 256 is ``<|endoftext|>``; vocab 257."""

    type = "byte"
    vocab_size = 257
    eod_id = 256
    path = None
    #: a constant identity, so datasets and checkpoints can check they agree
    sha256 = hashlib.sha256(b"hpcllm-byte-tokenizer-v1").hexdigest()

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def encode_np(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)

    def encode_batch_np(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [self.encode_np(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        # The EOD id (and anything out of range, e.g. sampled from a larger model head) is not
        # a byte: drop it; a window may start inside a multi-byte character, hence "replace".
        data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
        return data.decode("utf-8", errors="replace")


class HFTokenizer:
    """A HF ``tokenizers`` tokenizer.json (byte-level BPE trained by :func:`train_bpe`)."""

    type = "bpe"

    def __init__(self, path: str, eod_token: str | None = None):
        try:
            from tokenizers import Tokenizer
        except ImportError as e:  # pragma: no cover - a dependency of hpcllm
            raise HpcllmError(f"the 'tokenizers' package is needed for {path}: {e}") from None
        if not os.path.isfile(path):
            raise HpcllmError(f"{path}: tokenizer file does not exist")
        with open(path, "rb") as f:
            data = f.read()
        try:
            self._tok = Tokenizer.from_str(data.decode("utf-8"))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON, quoting the file
            raise HpcllmError(f"{path}: not a valid tokenizers tokenizer.json ({excerpt(e)})") from None
        self.path = os.path.abspath(path)
        self.sha256 = hashlib.sha256(data).hexdigest()
        if eod_token is None:
            # an HF model directory's tokenizer_config.json names its eos token
            eod_token = _eos_of_config(os.path.join(os.path.dirname(path), "tokenizer_config.json"))
        candidates = ([eod_token] if eod_token else []) + [EOD_TOKEN, *OTHER_EOD_TOKENS]
        eod = next(((t, i) for t in candidates if (i := self._tok.token_to_id(t)) is not None), None)
        if eod is None:
            raise HpcllmError(f"{path}: the tokenizer has no end-of-document token ({', '.join(candidates[:3])}, ...; "
                              "train one with `hpcllm tokenizer train`)")
        self.eod_token, self.eod_id = eod[0], int(eod[1])
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        self._fast = getattr(self._tok, "encode_batch_fast", None) or self._tok.encode_batch
        self._can_split = self._splittable()

    def __getstate__(self):
        # Workers re-load from the file: tokenizers objects pickle, but this keeps it cheap.
        return {"path": self.path, "eod_token": self.eod_token}

    def __setstate__(self, state):
        self.__init__(state["path"], state.get("eod_token"))

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._fast(list(texts), add_special_tokens=False)]

    #: characters per encode call in encode_batch_np. HF tokenizers needs about 400 bytes of
    #: memory per token of the text it encodes at once (alignments, Encoding objects), so
    #: texts are encoded in batches of this size and converted to arrays batch by batch
    BATCH_CHARS = 1 << 18
    #: long documents are cut into pieces of about this many characters (see _pieces)
    PIECE_CHARS = 1 << 16

    def _splittable(self) -> bool:
        """True for byte-level BPE with the GPT-2 regex pre-tokenizer and no normaliser.

        There, cutting a text just before a newline that follows a visible character gives
        exactly the tokens of the whole text: no pre-token joins a visible character and the
        whitespace after it, and a whitespace run is split by what follows it, which the cut
        does not change (tests/data check this on real text)."""
        cfg = json.loads(self._tok.to_str())
        pre = cfg.get("pre_tokenizer") or {}
        return cfg.get("normalizer") is None and pre.get("type") == "ByteLevel" and pre.get("use_regex", True)

    @staticmethod
    def _visible(c: str) -> bool:
        return c.isalnum() or ("!" <= c <= "~")

    def _pieces(self, text: str) -> list[str]:
        """``text`` cut at safe newlines about every PIECE_CHARS characters (whole if none)."""
        if len(text) <= self.BATCH_CHARS or not self._can_split:
            return [text]
        pieces, start, n = [], 0, len(text)
        while n - start > 2 * self.PIECE_CHARS:
            j = text.find("\n", start + self.PIECE_CHARS)
            while j != -1 and not self._visible(text[j - 1]):
                j = text.find("\n", j + 1)
            if j == -1:
                break
            pieces.append(text[start:j])  # the newline starts the next piece
            start = j
        pieces.append(text[start:])
        return pieces

    def encode_batch_np(self, texts: Sequence[str]) -> list[np.ndarray]:
        parts: list[list[np.ndarray]] = [[] for _ in texts]
        batch: list[str] = []
        owner: list[int] = []
        size = 0

        def flush():
            for k, e in zip(owner, self._fast(batch, add_special_tokens=False)):
                parts[k].append(np.asarray(e.ids, dtype=np.uint32))
            batch.clear()
            owner.clear()

        for k, t in enumerate(texts):
            for piece in self._pieces(t):
                if batch and size + len(piece) > self.BATCH_CHARS:
                    flush()
                    size = 0
                batch.append(piece)
                owner.append(k)
                size += len(piece)
        if batch:
            flush()
        return [p[0] if len(p) == 1 else np.concatenate(p) if p else np.zeros(0, np.uint32) for p in parts]

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids if 0 <= int(i) < self.vocab_size]
        return self._tok.decode(ids, skip_special_tokens=False)

    def encode_np(self, text: str) -> np.ndarray:
        return np.asarray(self.encode(text), dtype=np.uint32)


Tokenizer = ByteTokenizer | HFTokenizer


def _eos_of_config(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            tok = json.load(f).get("eos_token")
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(tok, dict):
        tok = tok.get("content")
    return tok if isinstance(tok, str) else None


def load_tokenizer(spec: str | None = None) -> Tokenizer:
    """``None``/"byte" gives the byte tokenizer; otherwise ``spec`` is a tokenizer.json path
    (or a dataset directory, whose recorded tokenizer is loaded)."""
    if spec is None or spec == "byte":
        return ByteTokenizer()
    spec = os.fspath(spec)
    if os.path.isdir(spec):
        if os.path.isfile(os.path.join(spec, "manifest.json")):
            return tokenizer_from_dataset(spec)
        if os.path.isfile(os.path.join(spec, "tokenizer.json")):
            # an HF model directory; an hpcllm export of a byte-tokenizer model says so
            cfg = os.path.join(spec, "tokenizer_config.json")
            try:
                with open(cfg, encoding="utf-8") as f:
                    if json.load(f).get("hpcllm_tokenizer") == "byte":
                        return ByteTokenizer()
            except (OSError, ValueError, AttributeError):
                pass
            return HFTokenizer(os.path.join(spec, "tokenizer.json"))
        raise HpcllmError(f"{spec}: directory holds neither a manifest.json nor a tokenizer.json")
    return HFTokenizer(spec)


def tokenizer_from_dataset(data_dir: str) -> Tokenizer:
    """The tokenizer a dataset was made with (its copied file, checked against the sha256)."""
    from hpcllm.data.shards import read_manifest

    manifest = read_manifest(data_dir)
    info = manifest["tokenizer"]
    if info["type"] == "byte":
        return ByteTokenizer()
    path = os.path.join(data_dir, info["file"])
    tok = HFTokenizer(path)
    if tok.sha256 != info["sha256"]:
        raise HpcllmError(f"{path}: sha256 {tok.sha256[:12]} does not match the manifest's {info['sha256'][:12]}")
    return tok


def train_bpe(texts: Iterator[str], vocab_size: int, out: str, min_frequency: int = 2) -> HFTokenizer:
    """Train a byte-level BPE (GPT-2 style pre-tokenizer) on ``texts`` and save ``out``.

    ``<|endoftext|>`` is the first added token; the 256 byte symbols are always in the
    alphabet, so any text encodes without unknown tokens.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 257 + 1:
        raise HpcllmError(f"--vocab-size {vocab_size}: must be at least 258 (256 bytes, {EOD_TOKEN}, one merge)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    from hpcllm.fileio import remove_stale_tmp

    remove_stale_tmp(out)  # a killed writer's half-written file
    tmp = f"{out}.tmp{os.getpid()}"
    try:
        tok.save(tmp)
        os.replace(tmp, out)
    except Exception as e:  # tokenizers raises a bare Exception ("No space left on device (os error 28)")
        if os.path.exists(tmp):
            os.unlink(tmp)
        from hpcllm.fileio import write_error

        err = e if isinstance(e, OSError) else OSError(0, excerpt(e, 80))
        raise write_error("the tokenizer", out, err) from None
    return HFTokenizer(out)


def tokenizer_manifest_entry(tok: Tokenizer, file: str | None) -> dict:
    """The ``tokenizer`` section of a dataset manifest."""
    return {"type": tok.type, "vocab_size": int(tok.vocab_size), "eod_id": int(tok.eod_id),
            "sha256": tok.sha256, "file": file}


def token_dtype(vocab_size: int):
    """uint16 when every id fits, else uint32 (the dataset contract)."""
    return np.uint16 if vocab_size <= 65536 else np.uint32


def describe(tok: Tokenizer) -> str:
    return json.dumps(tokenizer_manifest_entry(tok, os.path.basename(tok.path) if tok.path else None))
