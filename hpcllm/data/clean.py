"""Document cleaning: pure functions on text (no I/O, no state).

Normalisation is Unicode NFC and removal of control characters (Unicode category Cc) other
than ``\\n`` and ``\\t`` (so ``\\r\\n`` becomes ``\\n``). Filtering drops empty documents and those
shorter than ``min_chars`` characters. Deduplication and the train/val split both key on
:func:`content_hash` of the cleaned text, so they do not depend on worker count or order.
"""
from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass

#: C0 and C1 controls and DEL, except \t (0x09) and \n (0x0a)
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


@dataclass
class CleanOptions:
    """Which cleaning steps run (all on by default)."""

    #: normalise to Unicode NFC
    nfc: bool = True
    #: remove control characters other than \n and \t
    strip_control: bool = True
    #: drop documents with fewer characters than this (after normalisation)
    min_chars: int = 32
    #: drop exact duplicates (by content hash) across the whole run
    dedup: bool = True


def normalize(text: str, options: CleanOptions) -> str:
    if options.nfc and not unicodedata.is_normalized("NFC", text):
        text = unicodedata.normalize("NFC", text)
    if options.strip_control:
        text = _CONTROL.sub("", text)
    return text


def drop_reason(text: str, options: CleanOptions) -> str | None:
    """Why a cleaned document is dropped, or None to keep it."""
    if not text:
        return "empty"
    if len(text) < options.min_chars:
        return "too_short"
    return None


def content_hash(text: str) -> bytes:
    """16-byte BLAKE2b of the UTF-8 text: the identity for dedup and the val split."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def is_val(digest: bytes, val_fraction: float) -> bool:
    """Deterministic split: the first 8 bytes of the hash as a fraction of 2**64."""
    return int.from_bytes(digest[:8], "big") < int(val_fraction * (1 << 64))
