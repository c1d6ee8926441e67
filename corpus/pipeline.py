"""Corpus → packed token sequences: read · clean · dedup · tokenize (Ray Data) · mix · split · pack → parquet shards.

Stages and where they run::

    resolve sources (driver, fsspec)      missing path / no files / empty files / seq_len > model context → ConfigError
    read + normalise + filter + MinHash   Ray Data map_batches, streaming, block order preserved
    exact + near dedup                    driver: one pass over (hash, signature) in document order; keeps only hashes
                                          and the LSH index, streams kept texts to <out>/work/clean/<source>.parquet
    tokenizer (ensure_tokenizer)          SentencePiece trained on the cleaned text when data.tokenizer is empty
    tokenize (+ EOS after each document)  Ray Data map_batches over the cleaned shards
    split / mix / pack                    driver, streaming per source: held-out documents by salted hash rank;
                                          training mixture by weights; rows of seq_len + 1 tokens

Outputs in ``out_dir``: ``train/part-*.parquet`` and ``val/part-*.parquet`` (columns ``idx`` int64 0..N-1 in file
order and ``tokens`` list<int32> of length seq_len + 1), ``stats.json``, and ``DONE`` (written last, holding the
config hash: a later ``prepare`` with the same config and inputs reuses the directory; otherwise it is rebuilt).

stats.json: per source ``files``, ``documents_read``, ``removed`` {too_short, too_long, non_letter, repeated_lines,
exact_dup, near_dup} (each document counted once, at the first step that drops it), ``kept``, ``tokens`` (including
one EOS per document), ``val_documents``/``val_tokens``, ``train_tokens_before_mixing``/``_after_mixing``,
``train_token_share`` vs ``weight_share``, ``passes`` (>1 repeated, <1 subsampled); totals at the top level, plus
``train_sequences``, ``val_sequences``, ``vocab_size``, ``eos_id`` and the dropped packing tails.

The driver holds O(documents) small items (hashes, MinHash signatures of kept documents, token counts), never the
corpus text or the token stream as a whole. Ray must be initialised by the caller (a job or a test), or Ray Data
starts a local instance on first use.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import random
import shutil
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from corpus.clean import REASONS, ExactDedup, NearDedup, normalize, reject_reason, signatures, text_hash
from corpus.config import DataConfig, SourceConfig
from core.config import ConfigError

FORMATS = (".txt", ".jsonl", ".parquet")
FORMAT_VERSION = 1  # bump when the output layout or algorithm changes: invalidates prepared directories


@dataclass
class PreparedData:
    """What ``prepare`` produced: where the splits are and how big they are."""

    train_dir: Path
    val_dir: Path
    num_train: int
    """Training sequences (rows); idx runs 0..num_train-1."""
    num_val: int
    seq_len: int
    """Model sequence length; each row holds seq_len + 1 tokens."""
    stats: dict[str, Any]
    """The content of stats.json."""


@dataclass
class _Files:
    source: SourceConfig
    fs: Any  # fsspec filesystem
    paths: list[str]  # protocol-stripped paths on fs, sorted

    def by_format(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for p in self.paths:
            out.setdefault(_ext(p), []).append(p)
        return out


def _ext(path: str) -> str:
    for e in FORMATS:
        if path.endswith(e):
            return e
    return Path(path).suffix


# ---- resolving and validating sources (no Ray) --------------------------------------------------------------------

def resolve_source(src: SourceConfig) -> _Files:
    """List the files of one source; raise ConfigError naming the path when nothing usable is there."""
    where = f"data.sources[{src.name}].path"
    try:
        fs, root = fsspec.core.url_to_fs(src.path)
    except (ValueError, ImportError) as e:
        raise ConfigError(f"{where}: cannot open {src.path!r}: {e}") from e
    if any(ch in root for ch in "*?["):
        paths = [p for p in fs.glob(root) if fs.isfile(p)]
        if not paths:
            raise ConfigError(f"{where}: no file matches {src.path!r}")
    elif fs.isdir(root):
        paths = [p for p in fs.find(root) if _ext(p) in FORMATS]
        if not paths:
            raise ConfigError(f"{where}: directory {src.path!r} has no {'/'.join(FORMATS)} files")
    elif fs.isfile(root):
        paths = [root]
    else:
        raise ConfigError(f"{where}: {src.path!r} does not exist")
    bad = [p for p in paths if _ext(p) not in FORMATS]
    if bad:
        raise ConfigError(f"{where}: unsupported file type {bad[0]!r} (expected {', '.join(FORMATS)})")
    for p in paths:
        if _ext(p) == ".parquet":
            with fs.open(p, "rb") as f:
                names = pq.ParquetFile(f).schema_arrow.names
            if src.text_field not in names:
                raise ConfigError(f"data.sources[{src.name}].text_field: {p} has no column {src.text_field!r} "
                                  f"(columns: {names})")
        elif _ext(p) == ".jsonl":
            with fs.open(p, "rt", encoding="utf-8") as f:
                first = next((ln for ln in f if ln.strip()), None)
            if first is not None:
                try:
                    rec = json.loads(first)
                except json.JSONDecodeError as e:
                    raise ConfigError(f"{where}: {p}: first record is not valid JSON: {e}") from e
                if not isinstance(rec, dict) or src.text_field not in rec:
                    raise ConfigError(f"data.sources[{src.name}].text_field: {p}: first record has no field "
                                      f"{src.text_field!r}")
    return _Files(src, fs, sorted(paths))


def validate(cfg: DataConfig, *, max_seq_len: int | None = None) -> list[_Files]:
    """Every check that needs no Ray: sequence length vs the model, sources exist and are not all empty."""
    if max_seq_len is not None and cfg.seq_len > max_seq_len:
        raise ConfigError(f"data.seq_len={cfg.seq_len} is above the model's context (model.max_seq_len={max_seq_len})")
    files = [resolve_source(s) for s in cfg.sources]
    total = sum(f.fs.size(p) or 0 for f in files for p in f.paths)
    if total == 0:
        listed = ", ".join(p for f in files for p in f.paths)
        raise ConfigError(f"data.sources: the corpus is empty (every file has 0 bytes: {listed})")
    return files


# ---- Ray Data stages ----------------------------------------------------------------------------------------------

def _pa_filesystem(fs: Any) -> Any:
    """None for the local file system (Ray's default); otherwise the fsspec filesystem wrapped for pyarrow."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol in ("file", "local"):
        return None
    from pyarrow.fs import FSSpecHandler, PyFileSystem
    return PyFileSystem(FSSpecHandler(fs))


def _ordered(ds: Any) -> Any:
    ds.context.execution_options.preserve_order = True
    return ds


def _parse_txt(batch: dict[str, np.ndarray]) -> dict[str, list]:
    """Binary .txt files → documents (separated by one or more blank lines)."""
    texts: list[str] = []
    for path, raw in zip(batch["path"], batch["bytes"]):
        try:
            content = bytes(raw).decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 text: {e}") from e
        content = content.replace("\r\n", "\n")
        doc: list[str] = []
        for line in content.split("\n") + [""]:
            if line.strip():
                doc.append(line)
            elif doc:
                texts.append("\n".join(doc))
                doc = []
    return {"text": texts}


def _parse_jsonl(field: str, batch: dict[str, np.ndarray]) -> dict[str, list]:
    texts = []
    for path, line in zip(batch["path"], batch["text"]):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: a line is not valid JSON ({e}): {line[:80]!r}") from e
        value = rec.get(field) if isinstance(rec, dict) else None
        if not isinstance(value, str):
            raise ValueError(f"{path}: a record has no string field {field!r}: {line[:80]!r}")
        texts.append(value)
    return {"text": texts}


def _parquet_text(field: str, batch: dict[str, np.ndarray]) -> dict[str, list]:
    return {"text": ["" if t is None else str(t) for t in batch[field]]}


def _clean_batch(clean_cfg: Any, batch: dict[str, np.ndarray]) -> dict[str, Any]:
    """Normalise and filter; rejected documents keep only their reason (text emptied to save transfer)."""
    texts, reasons, hashes = [], [], []
    for raw in batch["text"]:
        t = normalize(str(raw), clean_cfg.normalization)
        r = reject_reason(t, clean_cfg)
        texts.append("" if r else t)
        reasons.append(r or "")
        hashes.append(text_hash(t) if not r else "")
    sig = np.zeros((len(texts), clean_cfg.num_perm if clean_cfg.near_dedup else 1), dtype=np.uint64)
    kept = [i for i, r in enumerate(reasons) if not r]
    if clean_cfg.near_dedup and kept:
        sig[kept] = signatures([texts[i] for i in kept], clean_cfg)
    return {"text": texts, "reason": reasons, "hash": hashes, "sig": sig}


def _read_source(files: _Files, cfg: DataConfig) -> Iterator[dict[str, Any]]:
    """Batches (text, reason, hash, sig) of one source, in file and document order."""
    import ray.data

    src = files.source
    kw: dict[str, Any] = {"filesystem": _pa_filesystem(files.fs)}
    if cfg.num_blocks:
        kw["override_num_blocks"] = cfg.num_blocks
    for ext, paths in sorted(files.by_format().items()):
        if ext == ".txt":
            ds = ray.data.read_binary_files(paths, include_paths=True, **kw).map_batches(_parse_txt)
        elif ext == ".jsonl":
            ds = ray.data.read_text(paths, include_paths=True, **kw).map_batches(
                functools.partial(_parse_jsonl, src.text_field))
        else:
            ds = ray.data.read_parquet(paths, **kw).select_columns([src.text_field]).map_batches(
                functools.partial(_parquet_text, src.text_field))
        ds = _ordered(ds.map_batches(functools.partial(_clean_batch, cfg.clean), batch_size=256))
        yield from ds.iter_batches(batch_size=1024, batch_format="numpy")


def _tokenizer(directory: str) -> Any:
    """load_tokenizer, cached per process and invalidated when the directory's files change."""
    d = Path(directory)
    stamp = tuple(sorted((p.name, p.stat().st_mtime_ns) for p in d.iterdir())) if d.is_dir() else ()
    return _load_tokenizer(str(d), stamp)


@functools.lru_cache(maxsize=4)
def _load_tokenizer(directory: str, stamp: tuple) -> Any:
    from model.tokenizer import load_tokenizer
    return load_tokenizer(directory)


def _tokenize_batch(tok_dir: str, batch: pa.Table) -> pa.Table:
    """Cleaned documents → token ids with EOS appended (one row per document)."""
    tok = _tokenizer(tok_dir)
    tokens = [tok.encode(t) + [tok.eos_id] for t in batch.column("text").to_pylist()]
    return pa.table({"doc": batch.column("doc"), "hash": batch.column("hash"),
                     "n": pa.array([len(t) for t in tokens], type=pa.int64()),
                     "tokens": pa.array(tokens, type=pa.list_(pa.int32()))})


# ---- cleaning (cached in <out>/work/clean) ------------------------------------------------------------------------

def _atomic_write(path: Path, text: str) -> None:
    """Write then rename: a reader sees the whole marker or none (a crash mid-way leaves no DONE)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _hash_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _inputs_fingerprint(files: list[_Files]) -> list[Any]:
    out = []
    for f in files:
        for p in f.paths:
            info = f.fs.info(p)
            out.append([f.source.name, p, info.get("size"), str(info.get("mtime", info.get("LastModified", "")))])
    return out


def clean_corpus(cfg: DataConfig, out_dir: Path, files: list[_Files] | None = None) -> dict[str, Any]:
    """Read, clean and dedup every source into ``out_dir/work/clean/<source>.parquet``; return the cleaning stats.

    Cached: reused when ``work/clean/DONE`` holds the same hash of the sources, clean settings and input files.
    Raises ValueError when nothing survives cleaning.
    """
    files = files if files is not None else validate(cfg)
    clean_dir = Path(out_dir) / "work" / "clean"
    key = _hash_json([FORMAT_VERSION, [dataclasses.asdict(s) for s in cfg.sources], dataclasses.asdict(cfg.clean),
                      _inputs_fingerprint(files)])
    done = clean_dir / "DONE"
    if done.is_file() and json.loads(done.read_text()).get("key") == key:
        return json.loads((clean_dir / "stats.json").read_text())
    shutil.rmtree(clean_dir, ignore_errors=True)
    clean_dir.mkdir(parents=True)

    exact, near = ExactDedup(), NearDedup(cfg.clean)
    stats: dict[str, Any] = {"normalization": cfg.clean.normalization, "sources": {}}
    schema = pa.schema([("doc", pa.int64()), ("hash", pa.string()), ("text", pa.string())])
    for f in files:
        name = f.source.name
        s = {"files": len(f.paths), "documents_read": 0, "removed": dict.fromkeys(REASONS + ("exact_dup", "near_dup"), 0),
             "kept": 0, "chars_kept": 0}
        with pq.ParquetWriter(clean_dir / f"{name}.parquet", schema) as writer:
            for batch in _read_source(f, cfg):
                docs, hashes, texts = [], [], []
                for text, reason, h, sig in zip(batch["text"], batch["reason"], batch["hash"], batch["sig"]):
                    s["documents_read"] += 1
                    if reason:
                        s["removed"][str(reason)] += 1
                        continue
                    if cfg.clean.exact_dedup and exact.seen_before(str(h)):
                        s["removed"]["exact_dup"] += 1
                        continue
                    if cfg.clean.near_dedup and near.is_duplicate(str(h), sig):
                        s["removed"]["near_dup"] += 1
                        continue
                    docs.append(s["kept"])
                    hashes.append(str(h))
                    texts.append(str(text))
                    s["kept"] += 1
                    s["chars_kept"] += len(text)
                if docs:
                    writer.write_table(pa.table({"doc": docs, "hash": hashes, "text": texts}, schema=schema))
        stats["sources"][name] = s
    totals = Counter()
    for s in stats["sources"].values():
        totals.update(s["removed"])
    stats["removed"] = dict(totals)
    stats["documents_read"] = sum(s["documents_read"] for s in stats["sources"].values())
    stats["kept"] = sum(s["kept"] for s in stats["sources"].values())
    if stats["kept"] == 0:
        raise ValueError(f"the corpus is empty after cleaning: {stats['documents_read']} documents read from "
                         f"{', '.join(s.path for s in cfg.sources)}, removed {stats['removed']} "
                         f"(see data.clean.* thresholds)")
    (clean_dir / "stats.json").write_text(json.dumps(stats, indent=2))
    _atomic_write(done, json.dumps({"key": key}))
    return stats


# ---- tokenizer ----------------------------------------------------------------------------------------------------

def ensure_tokenizer(cfg: DataConfig, out_dir: Path, vocab_size: int) -> str:
    """The tokenizer directory to use: ``cfg.tokenizer`` if set (must exist), else one trained on the cleaned corpus
    into ``out_dir/tokenizer`` (reused when already there for the same cleaned corpus and vocab_size)."""
    if cfg.tokenizer:
        d = Path(cfg.tokenizer)
        if not d.is_dir():
            raise ConfigError(f"data.tokenizer: {cfg.tokenizer!r} is not a directory")
        return str(d)
    out_dir = Path(out_dir)
    stats = clean_corpus(cfg, out_dir)
    tok_dir = out_dir / "tokenizer"
    key = _hash_json([(out_dir / "work" / "clean" / "DONE").read_text(), vocab_size])
    marker = tok_dir / "TRAINED_ON"
    if marker.is_file() and marker.read_text() == key:
        return str(tok_dir)
    from model.tokenizer import SentencePieceTokenizer

    text_file = out_dir / "work" / "tokenizer_input.txt"
    with open(text_file, "w", encoding="utf-8") as out:
        for name in stats["sources"]:
            for batch in pq.ParquetFile(out_dir / "work" / "clean" / f"{name}.parquet").iter_batches(columns=["text"]):
                for t in batch.column("text").to_pylist():
                    out.write(t + "\n")
    shutil.rmtree(tok_dir, ignore_errors=True)
    SentencePieceTokenizer.train([text_file], tok_dir, vocab_size=vocab_size, seed=cfg.seed)
    _atomic_write(marker, key)
    return str(tok_dir)


# ---- tokenize, split, mix, pack -----------------------------------------------------------------------------------

def _tokenize_source(clean_file: Path, tok_dir: str, out_file: Path, cfg: DataConfig) -> list[tuple[str, int]]:
    """Tokenize one cleaned source into ``out_file`` (doc, hash, tokens); returns [(hash, n_tokens)] in doc order."""
    import ray.data

    ds = ray.data.read_parquet(str(clean_file), **({"override_num_blocks": cfg.num_blocks} if cfg.num_blocks else {}))
    ds = _ordered(ds.map_batches(functools.partial(_tokenize_batch, tok_dir), batch_size=256, batch_format="pyarrow"))
    schema = pa.schema([("doc", pa.int64()), ("hash", pa.string()), ("tokens", pa.list_(pa.int32()))])
    meta: list[tuple[str, int]] = []
    with pq.ParquetWriter(out_file, schema) as writer:
        for b in ds.iter_batches(batch_size=1024, batch_format="pyarrow"):
            writer.write_table(b.select(["doc", "hash", "tokens"]).cast(schema))
            meta.extend(zip(b.column("hash").to_pylist(), b.column("n").to_pylist()))
    return meta


def _iter_docs(path: Path, keep: np.ndarray) -> Iterator[np.ndarray]:
    """Token arrays of the documents of ``path`` (a tokenized source) with keep[doc] True, in document order."""
    for batch in pq.ParquetFile(path).iter_batches(columns=["doc", "tokens"], batch_size=512):
        docs = batch.column("doc").to_numpy()
        toks = batch.column("tokens")
        for i, d in enumerate(docs):
            if keep[d]:
                yield toks[i].values.to_numpy()


class _ShardWriter:
    """Packs a token stream into rows of ``row_len`` tokens and writes parquet shards of ``rows_per_shard`` rows."""

    def __init__(self, out: Path, row_len: int, rows_per_shard: int) -> None:
        self.out, self.row_len, self.rows_per_shard = out, row_len, rows_per_shard
        out.mkdir(parents=True)
        self.buf = np.zeros(0, dtype=np.int32)
        self.rows: list[np.ndarray] = []
        self.num_rows = 0
        self.shards = 0
        self.tokens_in = 0

    def add(self, tokens: np.ndarray) -> None:
        self.tokens_in += len(tokens)
        self.buf = np.concatenate([self.buf, tokens.astype(np.int32)])
        while len(self.buf) >= self.row_len:
            self.rows.append(self.buf[:self.row_len])
            self.buf = self.buf[self.row_len:]
            if len(self.rows) >= self.rows_per_shard:
                self._flush()

    def _flush(self) -> None:
        if not self.rows:
            return
        idx = np.arange(self.num_rows, self.num_rows + len(self.rows), dtype=np.int64)
        table = pa.table({"idx": idx, "tokens": pa.array(self.rows, type=pa.list_(pa.int32()))})
        pq.write_table(table, self.out / f"part-{self.shards:05d}.parquet")
        self.num_rows += len(self.rows)
        self.shards += 1
        self.rows = []

    def close(self) -> int:
        """Write the last shard; the incomplete tail is dropped. Returns the number of tail tokens dropped."""
        self._flush()
        return len(self.buf)


def _split_docs(meta: dict[str, list[tuple[str, int]]], cfg: DataConfig) -> dict[str, np.ndarray]:
    """Per source, a bool array: True where the document is held out for validation.

    Documents are ranked by a seeded hash of their text hash (so the choice does not depend on order or on
    which other documents exist) and taken from the top until the validation share is reached.
    """
    row = cfg.seq_len + 1
    total = sum(n for m in meta.values() for _, n in m)
    want = max(math.ceil(cfg.val_fraction * total), cfg.min_val_sequences * row) if cfg.val_fraction > 0 else 0
    ranked = sorted(((hashlib.blake2b(f"{cfg.seed}:{h}".encode(), digest_size=8).digest(), name, i, n)
                     for name, m in meta.items() for i, (h, n) in enumerate(m)))
    val = {name: np.zeros(len(m), dtype=bool) for name, m in meta.items()}
    got = 0
    for _, name, i, n in ranked:
        if got >= want:
            break
        val[name][i] = True
        got += n
    if want and total - got < row:
        raise ValueError(f"the corpus is too small: {total} tokens after cleaning; the validation split takes {got} "
                         f"and the training split needs at least one sequence of {row} tokens "
                         f"(lower data.seq_len, data.val_fraction or data.min_val_sequences, or add text)")
    return val


def _mixture_plan(meta: dict[str, list[tuple[str, int]]], val: dict[str, np.ndarray], weights: dict[str, float],
                  seed: int) -> tuple[dict[str, list[np.ndarray]], dict[str, int]]:
    """Per source, a list of passes (each a per-document selection mask) giving weight-proportional token shares.

    The training total stays the number of cleaned training tokens; a source above its share is subsampled
    (a seeded random subset of documents), one below it is repeated (whole passes plus a subset).
    """
    rng = random.Random(seed)
    counts = {name: np.array([n for _, n in m], dtype=np.int64) for name, m in meta.items()}
    train_tokens = {name: int(counts[name][~val[name]].sum()) for name in meta}
    total = sum(train_tokens.values())
    wsum = sum(weights[name] for name in meta if train_tokens[name] > 0)
    plan: dict[str, list[np.ndarray]] = {}
    target: dict[str, int] = {}
    for name in meta:
        avail = ~val[name]
        if train_tokens[name] == 0:
            plan[name], target[name] = [], 0
            continue
        tgt = round(total * weights[name] / wsum)
        target[name] = tgt
        full, rest = divmod(tgt, train_tokens[name])
        passes = [avail.copy() for _ in range(full)]
        if rest > 0:
            order = [i for i in range(len(avail)) if avail[i]]
            rng.shuffle(order)
            mask = np.zeros(len(avail), dtype=bool)
            got = 0
            for i in order:
                if got >= rest:
                    break
                mask[i] = True
                got += int(counts[name][i])
            passes.append(mask)
        plan[name] = passes
    return plan, target


def _interleave(streams: dict[str, Iterator[np.ndarray]], budget: dict[str, int],
                seed: int) -> Iterator[tuple[str, np.ndarray]]:
    """Draw documents from the sources at random, weighted by each one's remaining planned tokens."""
    rng = random.Random(seed + 1)
    remaining = {k: v for k, v in budget.items() if v > 0}
    while remaining:
        names = sorted(remaining)
        name = rng.choices(names, weights=[remaining[n] for n in names])[0]
        doc = next(streams[name], None)
        if doc is None:
            del remaining[name]
            continue
        remaining[name] = max(remaining[name] - len(doc), 1)  # stays drawable until the stream ends
        yield name, doc


def _passes(path: Path, masks: list[np.ndarray]) -> Iterator[np.ndarray]:
    for m in masks:
        yield from _iter_docs(path, m)


def config_hash(cfg: DataConfig, files: list[_Files], tok_dir: str) -> str:
    tok_files = sorted(p for p in Path(tok_dir).iterdir() if p.is_file() and p.name != "TRAINED_ON")
    tok_digest = hashlib.sha256(b"".join(p.name.encode() + p.read_bytes() for p in tok_files)).hexdigest()
    d = dataclasses.asdict(cfg)
    d.pop("tokenizer")  # the path may move; its content counts
    d.pop("num_blocks")  # parallelism does not change the output
    return _hash_json([FORMAT_VERSION, d, tok_digest, _inputs_fingerprint(files)])


def prepare(cfg: DataConfig, out_dir: Path, *, max_seq_len: int | None = None) -> PreparedData:
    """Run the whole pipeline into ``out_dir`` (see the module docstring); reuse it when DONE matches.

    ``cfg.tokenizer`` must name a tokenizer directory (call ``ensure_tokenizer`` first to train one).
    ``max_seq_len`` is the model's context: a longer ``cfg.seq_len`` is a ConfigError. All input checks (missing
    paths, empty files, sequence length, tokenizer) run before any Ray work.
    """
    out_dir = Path(out_dir)
    files = validate(cfg, max_seq_len=max_seq_len)
    if not cfg.tokenizer:
        raise ConfigError("data.tokenizer is empty: call corpus.pipeline.ensure_tokenizer(cfg, out_dir, vocab_size) "
                          "first (llamaray clean does) or set data.tokenizer to a tokenizer directory")
    tok_dir = cfg.tokenizer
    try:
        tok = _tokenizer(tok_dir)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"data.tokenizer: {e}") from e
    key = config_hash(cfg, files, tok_dir)
    done = out_dir / "DONE"
    if done.is_file() and done.read_text().strip() == key:
        stats = json.loads((out_dir / "stats.json").read_text())
        return PreparedData(out_dir / "train", out_dir / "val", stats["train_sequences"], stats["val_sequences"],
                            cfg.seq_len, stats)
    done.unlink(missing_ok=True)
    for sub in ("train", "val", "work/tokens"):
        shutil.rmtree(out_dir / sub, ignore_errors=True)

    stats = clean_corpus(cfg, out_dir, files)
    tok_work = out_dir / "work" / "tokens"
    tok_work.mkdir(parents=True)
    meta = {name: _tokenize_source(out_dir / "work" / "clean" / f"{name}.parquet", tok_dir,
                                   tok_work / f"{name}.parquet", cfg)
            for name in stats["sources"]}
    row = cfg.seq_len + 1
    val = _split_docs(meta, cfg)
    weights = {s.name: s.weight for s in cfg.sources}
    plan, target = _mixture_plan(meta, val, weights, cfg.seed)

    train_w = _ShardWriter(out_dir / "train", row, cfg.rows_per_shard)
    streams = {name: _passes(tok_work / f"{name}.parquet", plan[name]) for name in meta}
    mixed = Counter()
    for name, doc in _interleave(streams, target, cfg.seed):
        mixed[name] += len(doc)
        train_w.add(doc)
    train_tail = train_w.close()
    val_w = _ShardWriter(out_dir / "val", row, cfg.rows_per_shard)
    for name in meta:
        for doc in _iter_docs(tok_work / f"{name}.parquet", val[name]):
            val_w.add(doc)
    val_tail = val_w.close()
    if train_w.num_rows == 0:
        raise ValueError(f"no training sequence of {row} tokens could be packed ({sum(mixed.values())} tokens)")
    if cfg.val_fraction > 0 and val_w.num_rows == 0:
        raise ValueError(f"no validation sequence of {row} tokens could be packed ({val_w.tokens_in} tokens held out)")

    train_total = sum(mixed.values())
    for name, s in stats["sources"].items():
        counts = np.array([n for _, n in meta[name]], dtype=np.int64)
        s["tokens"] = int(counts.sum())
        s["val_documents"] = int(val[name].sum())
        s["val_tokens"] = int(counts[val[name]].sum())
        s["train_tokens_before_mixing"] = int(counts[~val[name]].sum())
        s["train_tokens_after_mixing"] = int(mixed[name])
        s["train_token_share"] = round(mixed[name] / train_total, 4) if train_total else 0.0
        s["weight_share"] = round(weights[name] / sum(weights.values()), 4)
        s["passes"] = round(mixed[name] / max(s["train_tokens_before_mixing"], 1), 3)
    stats.update(tokenizer=tok_dir, vocab_size=tok.vocab_size, eos_id=tok.eos_id, seq_len=cfg.seq_len,
                 tokens=sum(s["tokens"] for s in stats["sources"].values()),
                 train_tokens=train_total, val_tokens=val_w.tokens_in,
                 train_sequences=train_w.num_rows, val_sequences=val_w.num_rows,
                 tail_tokens_dropped={"train": train_tail, "val": val_tail}, config_hash=key)
    (out_dir / "stats.json").write_text(json.dumps(stats, indent=2))
    _atomic_write(done, key + "\n")
    return PreparedData(out_dir / "train", out_dir / "val", train_w.num_rows, val_w.num_rows, cfg.seq_len, stats)


# ---- reading the result -------------------------------------------------------------------------------------------

def shard_files(split_dir: Path) -> list[str]:
    files = sorted(str(p) for p in Path(split_dir).glob("part-*.parquet"))
    if not files:
        raise FileNotFoundError(f"{split_dir}: no part-*.parquet shards (run corpus.pipeline.prepare first)")
    return files


def load_split(split_dir: Path) -> Any:
    """The split as a ``ray.data.Dataset`` of rows {idx, tokens}, in idx order (preserve_order is set on it).

    Ray Train REPLACES a dataset's execution options with the driver's global ones (ray/train/_internal/
    data_config.py: ``ds.context.execution_options = …``), dropping preserve_order; jobs/trainer.fit_on_ray keeps
    the order in training with ``ray.train.DataConfig(execution_options=ExecutionOptions(preserve_order=True))``.
    """
    import ray.data

    return _ordered(ray.data.read_parquet(shard_files(split_dir)))


def unigram_entropy(split_dir: Path) -> float:
    """Entropy of the token unigram distribution of a split, in NATS (comparable with a cross-entropy loss).

    Counts the target positions (tokens[1:] of every row), i.e. exactly what the loss is computed on; a model
    that learned only token frequencies would reach this loss.
    """
    counts = np.zeros(0, dtype=np.int64)
    for f in shard_files(split_dir):
        for batch in pq.ParquetFile(f).iter_batches(columns=["tokens"]):
            arr = batch.column("tokens")
            rows = np.stack(arr.to_numpy(zero_copy_only=False))[:, 1:].ravel()
            c = np.bincount(rows)
            if len(c) > len(counts):
                counts = np.pad(counts, (0, len(c) - len(counts)))
            counts[:len(c)] += c
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())
