"""Document cleaning as plain functions (no Ray): normalise, filter, hash, MinHash, and the dedup indexes.

``corpus.pipeline`` runs ``normalize``/``reject_reason``/``signatures`` inside Ray Data ``map_batches`` and keeps the
two dedup indexes (``ExactDedup``, ``NearDedup``) in the driver, which sees only hashes and MinHash signatures,
never the texts. Every function here is deterministic.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Iterable, Sequence

import numpy as np
from datasketch import LeanMinHash, MinHash, MinHashLSH

from corpus.config import CleanConfig

MINHASH_SEED = 1
_WORD = re.compile(r"\w+", re.UNICODE)

# Reasons a document is rejected, in the order they are checked (stats.json uses these names).
REASONS = ("too_short", "too_long", "non_letter", "repeated_lines")


def normalize(text: str, form: str = "NFKC") -> str:
    """Unicode normalisation (NFKC/NFC/none), unified line endings, no trailing spaces, stripped ends."""
    if form != "none":
        text = unicodedata.normalize(form, text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return "\n".join(line.rstrip() for line in text.split("\n")).strip()


def non_letter_ratio(text: str) -> float:
    """Share of non-whitespace characters that are not letters (Unicode category L*); 1.0 for blank text."""
    chars = [c for c in text if not c.isspace()]
    if not chars:
        return 1.0
    return sum(1 for c in chars if not c.isalpha()) / len(chars)


def repeated_line_ratio(text: str) -> float:
    """Share of non-empty lines that repeat an earlier line of the same document (0.0 for one line)."""
    lines = [ln.strip() for ln in text.split("\n") if ln.strip()]
    if not lines:
        return 0.0
    return (len(lines) - len(set(lines))) / len(lines)


def reject_reason(text: str, cfg: CleanConfig) -> str | None:
    """Why a (normalised) document is dropped, or None to keep it. Checked in the order of ``REASONS``."""
    if len(text) < cfg.min_chars:
        return "too_short"
    if cfg.max_chars and len(text) > cfg.max_chars:
        return "too_long"
    if non_letter_ratio(text) > cfg.max_non_letter_ratio:
        return "non_letter"
    if repeated_line_ratio(text) > cfg.max_repeated_line_ratio:
        return "repeated_lines"
    return None


def text_hash(text: str) -> str:
    """Exact-dedup key: blake2b-128 of the UTF-8 text, hex."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


def shingles(text: str, size: int) -> list[bytes]:
    """Word n-grams (lower-cased) as bytes; a text shorter than ``size`` words is one shingle."""
    words = [w.lower() for w in _WORD.findall(text)]
    if len(words) <= size:
        return [" ".join(words).encode("utf-8")]
    return sorted({" ".join(words[i:i + size]).encode("utf-8") for i in range(len(words) - size + 1)})


def signatures(texts: Sequence[str], cfg: CleanConfig) -> np.ndarray:
    """MinHash signatures of ``texts``: uint64 array (len(texts), num_perm)."""
    if not texts:
        return np.zeros((0, cfg.num_perm), dtype=np.uint64)
    hashes = MinHash.bulk([shingles(t, cfg.shingle_size) for t in texts], num_perm=cfg.num_perm, seed=MINHASH_SEED)
    return np.stack([m.hashvalues.astype(np.uint64) for m in hashes])


_SCHEME = MinHash(num_perm=16, seed=MINHASH_SEED).scheme


class ExactDedup:
    """Remembers hashes; ``seen_before(h)`` is True for the second and later occurrences."""

    def __init__(self) -> None:
        self._seen: set[str] = set()

    def seen_before(self, h: str) -> bool:
        if h in self._seen:
            return True
        self._seen.add(h)
        return False


class NearDedup:
    """MinHash-LSH index over kept documents; ``is_duplicate`` inserts a new document or reports a near duplicate.

    Candidates from the LSH buckets are confirmed with the estimated Jaccard similarity, so a bucket collision
    alone never drops a document.
    """

    def __init__(self, cfg: CleanConfig) -> None:
        self.cfg = cfg
        self._lsh = MinHashLSH(threshold=cfg.lsh_threshold, num_perm=cfg.num_perm)
        self._sigs: dict[str, LeanMinHash] = {}

    def is_duplicate(self, key: str, hashvalues: Iterable[int]) -> bool:
        m = LeanMinHash(seed=MINHASH_SEED, hashvalues=np.asarray(hashvalues, dtype=np.uint64), scheme=_SCHEME)
        for other in self._lsh.query(m):
            if m.jaccard(self._sigs[other]) >= self.cfg.lsh_threshold:
                return True
        self._lsh.insert(key, m)
        self._sigs[key] = m
        return False
