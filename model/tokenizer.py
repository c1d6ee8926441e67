"""Tokenizers behind one protocol: our own SentencePiece BPE, or any Hugging Face tokenizer of an imported model.

``SentencePieceTokenizer.train(files, out_dir, vocab_size=4096)`` trains a byte-fallback BPE model whose round trip is
exact: ``decode(encode(x)) == x`` for any Unicode text (Chinese, emoji, runs of spaces, tabs, newlines) — identity
normalization, no dummy prefix, no whitespace folding, unseen characters fall back to their UTF-8 bytes.
The one exception is U+2581 ("▁"), the character SentencePiece uses to stand for a space: it decodes as " ".

Ids 0–3 are ``<unk> <s> </s> <pad>``; the chat role markers ``<|system|> <|user|> <|assistant|> <|end|>`` follow as
user-defined symbols, so each is always exactly one id.

Chat format (``CHAT_TEMPLATE``, also written into tokenizer_config.json so ``AutoTokenizer`` and vLLM render the same
text)::

    <s><|system|>You are terse.<|end|><|user|>Hi<|end|><|assistant|>Hello!<|end|><|assistant|>

No newlines are inserted around markers: every piece of content sits between two user-defined symbols, so tokenizing
the whole rendered text and tokenizing message by message give the same ids, which is what makes ``render_chat``'s
assistant mask exact. A chat turn ends with ``<|end|>``: samplers stop on ``stop_ids`` (``</s>`` and ``<|end|>``).
As in transformers, marker texts inside message content are tokenized as markers (content is not escaped); callers
that take chat text from untrusted users and care should strip ``<|…|>`` markers first.
The template begins with the BOS text ``<s>`` (as Llama's templates do), so vLLM's chat endpoint and
``apply_chat_template(tokenize=True)``, which tokenize without adding special tokens, get exactly one BOS. ``encode``
turns the literal texts of the special tokens (``<s>``, ``</s>``, ``<unk>``, ``<pad>``) into their ids, as transformers
does, and ``encode(chat_text, bos=True)`` does not add a second BOS — so ``encode(apply_chat_template(m))``,
``encode(apply_chat_template(m), bos=True)`` and ``render_chat(m)[0]`` are the same ids.

Files written by ``save``: ``tokenizer.model``, ``tokenizer_config.json`` (``"tokenizer_class": "LlamaTokenizer"``,
``add_prefix_space: false``, ``legacy: false``, the chat template) and ``special_tokens_map.json``. We do not call
``LlamaTokenizer(vocab_file=…).save_pretrained``: in transformers 5 that silently writes a 3-token vocabulary.
transformers 5 converts ``tokenizer.model`` to its fast tokenizer on load; the tests check its ids against
sentencepiece's on every kind of text above.

``HFTokenizer(dir)`` wraps ``transformers.AutoTokenizer`` (e.g. SmolLM2's GPT-2-style byte-level BPE) behind the same
protocol; ``load_tokenizer(dir)`` picks the right class.
"""

from __future__ import annotations

import io
import json
import re
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import sentencepiece as spm

UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
ROLES = ("system", "user", "assistant")
ROLE_MARKERS = {role: f"<|{role}|>" for role in ROLES}
END_MARKER = "<|end|>"
CHAT_MARKERS = (*ROLE_MARKERS.values(), END_MARKER)
# ids 0..3 are the control tokens, then the chat markers, then 256 byte pieces: the smallest possible vocabulary.
MIN_VOCAB = 4 + len(CHAT_MARKERS) + 256

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


@runtime_checkable
class Tokenizer(Protocol):
    """What the rest of llamaray needs from a tokenizer (see docs/INTERFACES.md)."""

    @property
    def vocab_size(self) -> int: ...
    @property
    def bos_id(self) -> int: ...
    @property
    def eos_id(self) -> int: ...
    @property
    def pad_id(self) -> int: ...
    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...
    def apply_chat_template(self, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool = True) -> str: ...
    def save(self, out_dir: str | Path) -> None: ...


def validate_messages(messages: Any) -> list[dict[str, str]]:
    """Check a chat: a list of {"role": system|user|assistant, "content": str}; ValueError naming the bad message."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError(f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    if not messages:
        raise ValueError("messages is empty: a chat needs at least one message (transformers refuses one too)")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', got {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ValueError(f"messages[{i}].role must be one of {list(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be a string, got {type(content).__name__}")
        out.append({"role": role, "content": content})
    return out


def check_vocab(tokenizer: Tokenizer, vocab_size: int, source: str) -> None:
    """Raise ValueError when the tokenizer can emit ids that the model's embedding (``vocab_size`` rows) lacks.

    A tokenizer smaller than the model is fine (the extra rows are never indexed); a larger one is not.
    ``source`` names the file or config the model's vocab_size came from.
    """
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(f"{source}: the tokenizer has {tokenizer.vocab_size} ids but the model's vocab_size is "
                         f"{vocab_size}; ids >= {vocab_size} would index past the embedding table")


def _read_texts(files: Sequence[Path], text_field: str, max_chars: int) -> Iterable[str]:
    """Training sentences: the lines of .txt files and of the ``text_field`` of .jsonl records, chunked to max_chars."""
    for path in files:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer training input {path} does not exist or is not a file")
        if path.suffix == ".jsonl":
            docs: list[str] = []
            with path.open(encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{n}: not valid JSON: {e}") from e
                    if not isinstance(rec, dict) or not isinstance(rec.get(text_field), str):
                        raise ValueError(f"{path}:{n}: expected an object with a string field {text_field!r}")
                    docs.append(rec[text_field])
            lines = (ln for doc in docs for ln in doc.split("\n"))
        else:
            try:
                lines = iter(path.read_text(encoding="utf-8").split("\n"))
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}: not UTF-8 text: {e}") from e
        for line in lines:
            for start in range(0, len(line), max_chars):
                chunk = line[start:start + max_chars]
                if chunk.strip():
                    yield chunk


class SentencePieceTokenizer:
    """Our own tokenizer: a SentencePiece BPE model (see the module docstring for its guarantees)."""

    def __init__(self, model_file: str | Path | None = None, *, model_proto: bytes | None = None,
                 model_max_length: int | None = None) -> None:
        if (model_file is None) == (model_proto is None):
            raise ValueError("SentencePieceTokenizer needs exactly one of model_file or model_proto")
        if model_proto is None:
            path = Path(model_file)  # type: ignore[arg-type]
            if not path.is_file():
                raise FileNotFoundError(f"SentencePiece model {path} does not exist")
            model_proto = path.read_bytes()
        self._proto = model_proto
        self.source = str(model_file) if model_file is not None else "<in-memory model>"
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(model_proto)
        except Exception as e:  # sentencepiece raises RuntimeError/OSError with its own text
            raise ValueError(f"{self.source}: not a SentencePiece model ({e})") from e
        self.model_max_length = model_max_length
        expected = {0: UNK, 1: BOS, 2: EOS, 3: PAD}
        for i, piece in expected.items():
            if i >= self.sp.vocab_size() or self.sp.id_to_piece(i) != piece:
                raise ValueError(f"{self.source}: id {i} must be {piece!r} for llamaray's tokenizer files, got "
                                 f"{self.sp.id_to_piece(i) if i < self.sp.vocab_size() else 'nothing'!r}")
        self.marker_ids = {m: self.sp.piece_to_id(m) for m in CHAT_MARKERS}
        missing = [m for m, i in self.marker_ids.items() if i == self.sp.unk_id()]
        if missing:
            raise ValueError(f"{self.source}: the chat markers {missing} are not in the vocabulary")
        # The literal texts of the control tokens become their ids (transformers' added-token behaviour).
        self._special_re = re.compile("(" + "|".join(re.escape(t) for t in (UNK, BOS, EOS, PAD)) + ")")
        self._special_ids = {UNK: 0, BOS: 1, EOS: 2, PAD: 3}

    # ---- training -------------------------------------------------------------------------------------------------

    @classmethod
    def train(cls, files: Sequence[str | Path], out_dir: str | Path | None = None, vocab_size: int = 4096, *,
              text_field: str = "text", max_sentence_length: int = 4096, character_coverage: float = 0.9999,
              exact_vocab: bool = False, seed: int = 0, num_threads: int = 1,
              model_max_length: int | None = None) -> SentencePieceTokenizer:
        """Train a byte-fallback BPE tokenizer on .txt / .jsonl files; ``save`` it to ``out_dir`` when given.

        A small corpus may not support ``vocab_size`` merges: SentencePiece then stops early
        (``hard_vocab_limit=False``) and this warns with both numbers; ``exact_vocab=True`` makes that a ValueError
        instead. The result is deterministic for the same files and arguments (one thread, fixed seed).
        """
        if vocab_size < MIN_VOCAB + 1:
            raise ValueError(f"vocab_size={vocab_size} is too small: 4 control tokens + {len(CHAT_MARKERS)} chat "
                             f"markers + 256 byte pieces already take {MIN_VOCAB} ids")
        if not files:
            raise ValueError("no tokenizer training files given")
        if max_sentence_length < 16:
            raise ValueError(f"max_sentence_length must be >= 16 bytes, got {max_sentence_length}")
        files = [Path(f) for f in files]
        # A UTF-8 character takes at most 4 bytes: chunks of max_sentence_length // 4 characters are never dropped.
        sentences = list(_read_texts(files, text_field, max_sentence_length // 4))
        if not sentences:
            raise ValueError(f"tokenizer training files contain no text: {', '.join(map(str, files))}")
        spm.set_random_generator_seed(seed)
        buf = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(sentences), model_writer=buf, model_type="bpe", vocab_size=vocab_size,
                hard_vocab_limit=False, byte_fallback=True, character_coverage=character_coverage,
                unk_id=0, bos_id=1, eos_id=2, pad_id=3, unk_piece=UNK, bos_piece=BOS, eos_piece=EOS, pad_piece=PAD,
                user_defined_symbols=list(CHAT_MARKERS), normalization_rule_name="identity",
                add_dummy_prefix=False, remove_extra_whitespaces=False, split_digits=True,
                allow_whitespace_only_pieces=True, max_sentence_length=max_sentence_length,
                input_sentence_size=0, shuffle_input_sentence=False, num_threads=num_threads, minloglevel=2)
        except RuntimeError as e:
            raise ValueError(f"SentencePiece training on {', '.join(map(str, files))} failed: {e}") from e
        tok = cls(model_proto=buf.getvalue(), model_max_length=model_max_length)
        if tok.vocab_size < vocab_size:
            msg = (f"the corpus ({', '.join(map(str, files))}, {len(sentences)} lines) supports only "
                   f"{tok.vocab_size} of the {vocab_size} requested ids")
            if exact_vocab:
                raise ValueError(msg + "; give more text or a smaller vocab_size")
            warnings.warn(msg + f"; the tokenizer has {tok.vocab_size} ids (fits any model with vocab_size >= that)",
                          stacklevel=2)
        if out_dir is not None:
            tok.save(out_dir)
            tok.source = str(Path(out_dir) / "tokenizer.model")
        return tok

    # ---- the protocol ---------------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.sp.vocab_size()

    @property
    def bos_id(self) -> int:
        return 1

    @property
    def eos_id(self) -> int:
        return 2

    @property
    def pad_id(self) -> int:
        return 3

    @property
    def stop_ids(self) -> list[int]:
        """Ids that end a generation: ``</s>`` and the end-of-turn marker ``<|end|>``."""
        return [self.eos_id, self.marker_ids[END_MARKER]]

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        """Text → ids; the literal texts ``<s> </s> <unk> <pad>`` become their ids, chat markers are single ids.

        ``bos=True`` prepends BOS unless the text already starts with it (a rendered chat does): never two BOS.
        transformers' ``add_special_tokens=True`` would double it; this is the one place we differ, on purpose.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        ids: list[int] = []
        for part in self._special_re.split(text):
            if part in self._special_ids:
                ids.append(self._special_ids[part])
            elif part:
                ids.extend(self.sp.encode(part))
        if bos and ids[:1] != [self.bos_id]:
            ids.insert(0, self.bos_id)
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Ids → text. Control tokens are written as their text (``<s>``…), as transformers does without skipping."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"decode: ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")
        out, run = [], []
        for i in ids:
            if i < 4:
                out.append(self.sp.decode(run))
                out.append(self.sp.id_to_piece(i))
                run = []
            else:
                run.append(i)
        out.append(self.sp.decode(run))
        return "".join(out)

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))

    def apply_chat_template(self, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool = True) -> str:
        """The text ``CHAT_TEMPLATE`` renders (identical to transformers' and vLLM's rendering of the saved files)."""
        msgs = validate_messages(messages)
        text = BOS + "".join(ROLE_MARKERS[m["role"]] + m["content"] + END_MARKER for m in msgs)
        return text + (ROLE_MARKERS["assistant"] if add_generation_prompt else "")

    def render_chat(self, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool = False
                    ) -> tuple[list[int], list[bool]]:
        """A chat as ids plus a mask that is True on the tokens of each assistant content and its ``<|end|>``.

        ``ids == encode(apply_chat_template(messages, add_generation_prompt=…))``; for SFT, train on masked-in tokens.
        """
        msgs = validate_messages(messages)
        ids, mask = [self.bos_id], [False]
        for m in msgs:
            is_assistant = m["role"] == "assistant"
            ids.append(self.marker_ids[ROLE_MARKERS[m["role"]]])
            mask.append(False)
            content = self.encode(m["content"]) + [self.marker_ids[END_MARKER]]
            ids += content
            mask += [is_assistant] * len(content)
        if add_generation_prompt:
            ids.append(self.marker_ids[ROLE_MARKERS["assistant"]])
            mask.append(False)
        return ids, mask

    # ---- files ----------------------------------------------------------------------------------------------------

    def tokenizer_config(self) -> dict[str, Any]:
        """tokenizer_config.json: read by transformers' AutoTokenizer and vLLM."""
        added = {str(i): {"content": p, "lstrip": False, "rstrip": False, "normalized": False, "single_word": False,
                          "special": i < 4}
                 for i, p in enumerate((UNK, BOS, EOS, PAD))}
        for m, i in self.marker_ids.items():
            added[str(i)] = {"content": m, "lstrip": False, "rstrip": False, "normalized": False,
                             "single_word": False, "special": False}
        cfg: dict[str, Any] = {
            "tokenizer_class": "LlamaTokenizer",
            "bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "pad_token": PAD,
            "add_bos_token": True, "add_eos_token": False,
            # No dummy prefix space and no legacy handling: the same ids as sentencepiece (checked in the tests).
            "add_prefix_space": False, "legacy": False,
            "clean_up_tokenization_spaces": False, "spaces_between_special_tokens": False,
            "sp_model_kwargs": {},
            "added_tokens_decoder": added,
            "chat_template": CHAT_TEMPLATE,
        }
        if self.model_max_length is not None:
            cfg["model_max_length"] = self.model_max_length
        return cfg

    def save(self, out_dir: str | Path) -> None:
        """Write tokenizer.model, tokenizer_config.json and special_tokens_map.json into ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "tokenizer.model").write_bytes(self._proto)
        (out / "tokenizer_config.json").write_text(json.dumps(self.tokenizer_config(), indent=2, ensure_ascii=False)
                                                   + "\n", encoding="utf-8")
        special = {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "pad_token": PAD}
        (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, directory: str | Path) -> SentencePieceTokenizer:
        d = Path(directory)
        cfg = _read_json(d / "tokenizer_config.json") if (d / "tokenizer_config.json").is_file() else {}
        mml = cfg.get("model_max_length")
        return cls(d / "tokenizer.model", model_max_length=mml if isinstance(mml, int) else None)


class HFTokenizer:
    """An imported model's tokenizer (``transformers.AutoTokenizer``) behind the llamaray protocol.

    ``bos_id``: the tokenizer's bos_token_id; when it has none (GPT-2-style BPEs), its eos_token_id — the GPT-2
    convention of one ``<|endoftext|>`` between documents. A tokenizer with neither is rejected. ``pad_id``: the
    pad_token_id, else eos_id. ``encode`` never adds special tokens on its own: ``bos``/``eos`` decide (and, as for
    SentencePieceTokenizer, ``bos=True`` adds no second BOS to a text that already starts with one).
    """

    def __init__(self, directory: str | Path) -> None:
        from transformers import AutoTokenizer  # heavy import: only for imported models

        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise FileNotFoundError(f"tokenizer directory {self.directory} does not exist")
        try:
            self.tok = AutoTokenizer.from_pretrained(str(self.directory))
        except (OSError, ValueError) as e:
            raise ValueError(f"{self.directory}: transformers cannot load a tokenizer from it: {e}") from e
        eos = self.tok.eos_token_id
        if eos is None:
            raise ValueError(f"{self.directory}: the tokenizer defines no eos_token (tokenizer_config.json)")
        self._eos = int(eos)
        self._bos = int(self.tok.bos_token_id) if self.tok.bos_token_id is not None else self._eos
        self._pad = int(self.tok.pad_token_id) if self.tok.pad_token_id is not None else self._eos

    @property
    def vocab_size(self) -> int:
        return len(self.tok)  # the base vocabulary plus added tokens

    @property
    def bos_id(self) -> int:
        return self._bos

    @property
    def eos_id(self) -> int:
        return self._eos

    @property
    def pad_id(self) -> int:
        return self._pad

    @property
    def stop_ids(self) -> list[int]:
        """Ids that end a generation: the eos token (ChatML tokenizers such as SmolLM2's use ``<|im_end|>``)."""
        return [self._eos]

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        ids = list(self.tok.encode(text, add_special_tokens=False))
        if bos and ids[:1] != [self._bos]:  # never two BOS (a rendered ChatML chat starts with SmolLM2's BOS)
            ids.insert(0, self._bos)
        return ids + ([self._eos] if eos else [])

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def apply_chat_template(self, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool = True) -> str:
        msgs = validate_messages(messages)
        if not getattr(self.tok, "chat_template", None):
            raise ValueError(f"{self.directory}: the tokenizer has no chat_template (tokenizer_config.json)")
        return self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt)

    def render_chat(self, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool = False
                    ) -> tuple[list[int], list[bool]]:
        """A chat as ids plus a mask that is True on each assistant turn's tokens, for SFT.

        Works for any prefix-stable template (rendering messages[:k] is a prefix of rendering messages[:k+1]; ChatML
        templates such as SmolLM2's are): the masked text of assistant turn k is what the template adds after the
        generation prompt — the content plus the template's end-of-turn text (for ChatML ``<|im_end|>\\n``).
        Text segments are tokenized one by one, so the mask is exact; the ids equal tokenizing the whole rendered text
        except where a byte-level BPE would merge whitespace across a segment boundary (content starting with
        whitespace). Raises ValueError for templates that rewrite earlier turns, and for a chat whose first message
        is the assistant's (there is no prompt to render before it).
        """
        msgs = validate_messages(messages)
        segments: list[tuple[str, bool]] = []
        prev = ""
        for k, m in enumerate(msgs):
            full = self.apply_chat_template(msgs[:k + 1], add_generation_prompt=False)
            if m["role"] == "assistant":
                if k == 0:
                    raise ValueError("render_chat: the chat starts with an assistant message; nothing to prompt it")
                head = self.apply_chat_template(msgs[:k], add_generation_prompt=True)
            else:
                head = full
            if not (head.startswith(prev) and full.startswith(head)):
                raise ValueError(f"{self.directory}: the chat template is not prefix-stable at message {k} "
                                 "(it rewrites earlier turns), so assistant tokens cannot be masked")
            segments.append((head[len(prev):], False))
            segments.append((full[len(head):], m["role"] == "assistant"))
            prev = full
        if add_generation_prompt:
            final = self.apply_chat_template(msgs, add_generation_prompt=True)
            segments.append((final[len(prev):], False))
        ids: list[int] = []
        mask: list[bool] = []
        for text, masked in segments:
            if text:
                seg = self.tok.encode(text, add_special_tokens=False)
                ids += seg
                mask += [masked] * len(seg)
        return ids, mask

    def save(self, out_dir: str | Path) -> None:
        self.tok.save_pretrained(str(out_dir))


def _read_json(path: Path) -> dict[str, Any]:
    from core.files import read_json

    return read_json(path, ValueError)


def load_tokenizer(directory: str | Path) -> SentencePieceTokenizer | HFTokenizer:
    """Our SentencePieceTokenizer for a directory ``save`` wrote, else HFTokenizer (AutoTokenizer).

    Ours: tokenizer.model plus a tokenizer_config.json with ``"tokenizer_class": "LlamaTokenizer"`` and our
    ``CHAT_TEMPLATE`` (a Llama-2 directory also has tokenizer.model, but not our control ids and markers).
    """
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"tokenizer directory {d} does not exist")
    cfg_path = d / "tokenizer_config.json"
    cfg = _read_json(cfg_path) if cfg_path.is_file() else {}
    if (d / "tokenizer.model").is_file() and cfg.get("tokenizer_class") in ("LlamaTokenizer", "LlamaTokenizerFast") \
            and cfg.get("chat_template") == CHAT_TEMPLATE:
        return SentencePieceTokenizer.load(d)
    if not ((d / "tokenizer.json").is_file() or (d / "tokenizer.model").is_file() or (d / "vocab.json").is_file()):
        raise FileNotFoundError(f"{d}: no tokenizer files (tokenizer.model, tokenizer.json or vocab.json) found")
    return HFTokenizer(d)
