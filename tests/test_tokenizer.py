"""The tokenizer: exact round trips, parity with transformers' AutoTokenizer, chat template and SFT mask, bad input.

One tokenizer is trained per module on a generated corpus (English, Chinese, emoji, numbers) and saved to a
temporary directory; AutoTokenizer loads that directory as a user (or vLLM) would.
"""

from __future__ import annotations

import json
import pickle
import random
from pathlib import Path

import pytest

from jobs import cli
from jobs import tokenizer as tokenizer_job
from model.tokenizer import (CHAT_MARKERS, CHAT_TEMPLATE, END_MARKER, HFTokenizer, SentencePieceTokenizer,
                             Tokenizer, check_vocab, load_tokenizer)

VOCAB = 1200
WORDS = ("the a model learns from data every token counts when training language systems on small machines "
         "numbers like these appear in text and the quick brown fox jumps over lazy dogs while users ask questions "
         "assistants answer politely").split()
CHINESE = "你好世界今天天气很好我们学习语言模型数据训练中文测试一二三四五六七八九十"
EMOJI = ["🙂", "🚀", "👍", "🎉", "❤️", "🤖"]


def write_corpus(path: Path, n_lines: int = 2500, seed: int = 0) -> Path:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 14))]
        line = " ".join(words).capitalize() + "."
        r = rng.random()
        if r < 0.3:
            line += f" It costs {rng.randint(0, 99999)} dollars, or {rng.random() * 100:.2f} percent."
        elif r < 0.5:
            line += " " + "".join(rng.choice(CHINESE) for _ in range(rng.randint(3, 12))) + "。"
        elif r < 0.6:
            line += " " + rng.choice(EMOJI) * rng.randint(1, 3)
        lines.append(line)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt")


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory) -> tuple[SentencePieceTokenizer, Path]:
    out = tmp_path_factory.mktemp("tok")
    tok = SentencePieceTokenizer.train([corpus], out, vocab_size=VOCAB, model_max_length=512)
    return tok, out


@pytest.fixture(scope="module")
def hf(trained):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(trained[1]))


ROUND_TRIP = [
    "", " ", "  ", "\n", "\t", "hello world", "Hello World!", " leading space", "   three leading", "trailing   ",
    "multiple    inner     spaces", "line one\nline two\n\nline four\n", "tab\tseparated\tvalues\t", "\r\nwindows\r\n",
    "你好世界", "今天天气很好，我们学习。", "龘靐齉爩 unseen rare characters", "mixed 中文 and English 123",
    "emoji 🙂🚀 and 👍🏽 skin tone, 👨‍👩‍👧 family, 🇯🇵 flag", "numbers 1234567890 3.14159 -42 1e10",
    "Ünïcödé çåfé naïve résumé", "Ελληνικά русский العربية עברית हिन्दी 한국어 日本語のテキスト",
    "math ∑ ∫ √ ≠ ≤ ∞ and symbols © ® ™ €", "zero\u200bwidth\u200djoiner\u00a0nbsp", "\x00\x01 control \x7f",
    "<|user|>hi<|end|><|assistant|>there<|end|>", "literal <s> and </s> and <unk> and <pad> texts",
    "<|not a marker|> <| user |>", "code:\n    def f(x):\n\treturn x  # tab\n",
]


def random_unicode(rng: random.Random, n: int) -> str:
    ranges = [(0x20, 0x7E), (0x09, 0x0A), (0xA0, 0x24F), (0x370, 0x3FF), (0x4E00, 0x9FFF), (0x1F300, 0x1FAFF),
              (0x3040, 0x30FF), (0xAC00, 0xD7A3), (0x10000, 0x1000F)]
    out = []
    for _ in range(n):
        lo, hi = rng.choice(ranges)
        out.append(chr(rng.randint(lo, hi)))
    return "".join(out).replace("\u2581", " ")


def test_round_trip_is_exact(trained):
    tok, _ = trained
    rng = random.Random(1)
    texts = ROUND_TRIP + [random_unicode(rng, rng.randint(1, 60)) for _ in range(300)]
    for text in texts:
        ids = tok.encode(text)
        assert tok.decode(ids) == text, repr(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.encode("hi", bos=True, eos=True)[0] == tok.bos_id
    assert tok.encode("hi", bos=True, eos=True)[-1] == tok.eos_id
    assert tok.decode(tok.encode("hi", bos=True, eos=True)) == "<s>hi</s>"
    assert tok.encode("<s>hi", bos=True) == tok.encode("hi", bos=True)  # never two BOS


def test_vocabulary_layout(trained):
    tok, _ = trained
    assert tok.vocab_size == VOCAB  # the corpus supports the full vocabulary
    assert [tok.id_to_piece(i) for i in range(4)] == ["<unk>", "<s>", "</s>", "<pad>"]
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 3)
    # unseen Chinese characters fall back to their UTF-8 bytes, never <unk>
    ids = tok.encode("龘")
    assert [tok.id_to_piece(i) for i in ids] == ["<0xE9>", "<0xBE>", "<0x98>"]
    assert 0 not in tok.encode("".join(ROUND_TRIP).replace("<unk>", ""))
    assert tok.encode("a<unk>b").count(0) == 1  # only the literal text of the unk token
    # seen text is compressed well below one id per byte; digits are split one per id
    english = "the model learns from data when training language systems"
    assert len(tok.encode(english)) < len(english.encode()) / 3
    assert [tok.id_to_piece(i) for i in tok.encode("2024")] == ["2", "0", "2", "4"]
    # U+2581 is SentencePiece's space symbol: the one character that does not survive the round trip
    assert tok.decode(tok.encode("a\u2581b")) == "a b"


def test_chat_markers_are_single_ids(trained, hf):
    tok, _ = trained
    for marker in CHAT_MARKERS:
        ids = tok.encode(marker)
        assert len(ids) == 1 and ids[0] >= 4 and tok.id_to_piece(ids[0]) == marker
        assert hf.encode(marker, add_special_tokens=False) == ids
        assert tok.encode(f"x{marker}y")[1] == ids[0]
    assert tok.stop_ids == [tok.eos_id, tok.encode(END_MARKER)[0]]


def test_autotokenizer_ids_equal_sentencepiece(trained, hf):
    tok, out = trained
    assert len(hf) == tok.vocab_size
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id, hf.unk_token_id) == (1, 2, 3, 0)
    assert hf.model_max_length == 512
    rng = random.Random(2)
    texts = ROUND_TRIP + [random_unicode(rng, rng.randint(1, 40)) for _ in range(150)]
    for text in texts:
        ours = tok.encode(text)
        assert hf.encode(text, add_special_tokens=False) == ours, repr(text)
        assert hf.encode(text) == [tok.bos_id] + ours, repr(text)  # add_bos_token: true, add_eos_token: false
        assert hf.decode(ours) == tok.decode(ours), repr(text)
    files = json.loads((out / "tokenizer_config.json").read_text())
    assert files["tokenizer_class"] == "LlamaTokenizer" and files["chat_template"] == CHAT_TEMPLATE
    assert json.loads((out / "special_tokens_map.json").read_text())["pad_token"] == "<pad>"


def test_corpus_lines_tokenize_identically(trained, hf, corpus):
    tok, _ = trained
    lines = corpus.read_text(encoding="utf-8").split("\n")[:400]
    text = "\n".join(lines)
    assert hf.encode(text, add_special_tokens=False) == tok.encode(text)
    assert tok.decode(tok.encode(text)) == text


CHATS = [
    [{"role": "user", "content": "What is 17 + 25?"}, {"role": "assistant", "content": "17 + 25 = 42."}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": " 你好 🙂 "},
     {"role": "assistant", "content": "  Hello!\n\tTwo lines.  "}, {"role": "user", "content": "Again?"},
     {"role": "assistant", "content": "龘 yes <s> literally"}],
    [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}],
    [{"role": "system", "content": "only a system prompt"}],
]


@pytest.mark.parametrize("chat", CHATS)
def test_chat_template_matches_transformers(trained, hf, chat):
    tok, _ = trained
    for gen in (True, False):
        ours = tok.apply_chat_template(chat, add_generation_prompt=gen)
        assert hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen) == ours
        ids, mask = tok.render_chat(chat, add_generation_prompt=gen)
        assert len(ids) == len(mask)
        assert ids == tok.encode(ours)  # the template's leading "<s>" text is the bos id
        assert ids == tok.encode(ours, bos=True)  # ... and bos=True adds no second one
        assert ids.count(tok.bos_id) == 1 + sum(m["content"].count("<s>") for m in chat)
        hf_ids = hf.apply_chat_template(chat, tokenize=True, add_generation_prompt=gen)
        if isinstance(hf_ids, dict) or hasattr(hf_ids, "keys"):  # transformers 5 may return a BatchEncoding
            hf_ids = hf_ids["input_ids"]
        assert list(hf_ids) == ids
    assert tok.apply_chat_template(chat, add_generation_prompt=True).endswith("<|assistant|>")


@pytest.mark.parametrize("chat", CHATS)
def test_assistant_mask_covers_exactly_assistant_content(trained, chat):
    tok, _ = trained
    ids, mask = tok.render_chat(chat)
    runs, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    expected = [m["content"] + END_MARKER for m in chat if m["role"] == "assistant"]
    assert [tok.decode(r) for r in runs] == expected
    # everything outside the mask is the prompt: bos, markers, system/user turns
    assert tok.decode([i for i, m in zip(ids, mask) if not m]) == "<s>" + "".join(
        f"<|{m['role']}|>" + (m["content"] + END_MARKER if m["role"] != "assistant" else "") for m in chat)


def test_bad_messages_raise(trained):
    tok, _ = trained
    with pytest.raises(ValueError, match=r"messages\[1\]\.role must be one of"):
        tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}])
    with pytest.raises(ValueError, match=r"messages\[0\]\.content must be a string, got int"):
        tok.render_chat([{"role": "user", "content": 3}])
    with pytest.raises(ValueError, match=r"messages\[0\] must be a dict"):
        tok.apply_chat_template(["hello"])
    with pytest.raises(ValueError, match="messages is empty"):
        tok.render_chat([])
    with pytest.raises(ValueError, match="must be a list"):
        tok.apply_chat_template("hello")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])


def test_training_is_deterministic_and_handles_jsonl(corpus, tmp_path):
    lines = corpus.read_text(encoding="utf-8").split("\n")[:600]
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": "\n".join(lines[i:i + 3]), "id": i}) + "\n"
                             for i in range(0, len(lines), 3)), encoding="utf-8")
    txt = tmp_path / "docs.txt"
    txt.write_text("\n".join(lines), encoding="utf-8")
    a = SentencePieceTokenizer.train([jsonl], tmp_path / "a", vocab_size=600)
    b = SentencePieceTokenizer.train([jsonl], tmp_path / "b", vocab_size=600)
    SentencePieceTokenizer.train([txt], tmp_path / "c", vocab_size=600)
    model_a = (tmp_path / "a" / "tokenizer.model").read_bytes()
    assert model_a == (tmp_path / "b" / "tokenizer.model").read_bytes()
    assert model_a == (tmp_path / "c" / "tokenizer.model").read_bytes()  # same lines, either format
    assert a.encode("the model learns") == b.encode("the model learns")


def test_small_corpus_vocab_limit(tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("tiny corpus with few words\n" * 20, encoding="utf-8")
    with pytest.warns(UserWarning, match=r"supports only \d+ of the 4096 requested ids"):
        tok = SentencePieceTokenizer.train([small], None, vocab_size=4096)
    assert 264 < tok.vocab_size < 4096
    assert tok.decode(tok.encode("words 🙂 never seen")) == "words 🙂 never seen"
    with pytest.raises(ValueError, match=r"supports only \d+ of the 4096 requested ids.*smaller vocab_size"):
        SentencePieceTokenizer.train([small], None, vocab_size=4096, exact_vocab=True)


def test_training_errors(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n   \n\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"contain no text: .*empty\.txt"):
        SentencePieceTokenizer.train([empty], tmp_path / "o", vocab_size=1000)
    with pytest.raises(FileNotFoundError, match=r"missing\.txt does not exist"):
        SentencePieceTokenizer.train([tmp_path / "missing.txt"], tmp_path / "o", vocab_size=1000)
    with pytest.raises(ValueError, match=r"vocab_size=100 is too small"):
        SentencePieceTokenizer.train([empty], tmp_path / "o", vocab_size=100)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text field"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: expected an object with a string field 'text'"):
        SentencePieceTokenizer.train([bad], tmp_path / "o", vocab_size=1000)
    assert not (tmp_path / "o").exists()


def test_check_vocab(trained):
    tok, _ = trained
    check_vocab(tok, VOCAB, "config.json")
    check_vocab(tok, 4096, "config.json")  # a model larger than the tokenizer is fine
    with pytest.raises(ValueError, match=rf"ckpt/config\.json: the tokenizer has {VOCAB} ids but the model's "
                                         r"vocab_size is 1000"):
        check_vocab(tok, 1000, "ckpt/config.json")


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")  # SmolLM2's format


def make_gpt2_style_dir(corpus: Path, out: Path) -> Path:
    """A byte-level BPE tokenizer without a bos token, saved the way HF checkpoints ship it (tokenizer.json)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    raw.train([str(corpus)], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    fast.chat_template = CHATML
    fast.save_pretrained(str(out))
    return out


def test_load_tokenizer_picks_the_right_class(trained, corpus, tmp_path):
    tok, out = trained
    ours = load_tokenizer(out)
    assert isinstance(ours, SentencePieceTokenizer) and isinstance(ours, Tokenizer)
    assert ours.encode("你好 world") == tok.encode("你好 world") and ours.model_max_length == 512
    # Ray ships tokenizers to workers by pickling them
    assert pickle.loads(pickle.dumps(ours)).encode("你好 <s> world") == tok.encode("你好 <s> world")

    gpt2 = load_tokenizer(make_gpt2_style_dir(corpus, tmp_path / "gpt2"))
    assert isinstance(gpt2, HFTokenizer) and isinstance(gpt2, Tokenizer)
    assert gpt2.bos_id == gpt2.eos_id == gpt2.pad_id  # no bos/pad token: <|endoftext|> stands in
    assert gpt2.stop_ids == [gpt2.eos_id]
    text = "  Hello 你好 🙂\n\tworld  "
    ids = gpt2.encode(text, bos=True, eos=True)
    assert ids[0] == ids[-1] == gpt2.eos_id and gpt2.decode(ids[1:-1]) == text
    assert pickle.loads(pickle.dumps(gpt2)).encode(text) == gpt2.encode(text)
    chat = [{"role": "user", "content": "hi"}]
    assert gpt2.apply_chat_template(chat) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(ValueError, match="role must be one of"):
        gpt2.apply_chat_template([{"role": "robot", "content": "hi"}])
    with pytest.raises(ValueError, match=r"tokenizer has \d+ ids but the model's vocab_size is 10"):
        check_vocab(gpt2, 10, "imported/config.json")
    gpt2.save(tmp_path / "gpt2-copy")
    assert load_tokenizer(tmp_path / "gpt2-copy").encode(text) == gpt2.encode(text)

    empty = tmp_path / "nothing-here"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"nothing-here: no tokenizer files"):
        load_tokenizer(empty)
    with pytest.raises(FileNotFoundError, match=r"not-a-dir does not exist"):
        load_tokenizer(tmp_path / "not-a-dir")


@pytest.mark.parametrize("chat", CHATS[:3])
def test_hf_tokenizer_render_chat_mask(corpus, tmp_path, chat):
    gpt2 = HFTokenizer(make_gpt2_style_dir(corpus, tmp_path / "gpt2"))
    for gen in (False, True):
        ids, mask = gpt2.render_chat(chat, add_generation_prompt=gen)
        hf_ids = gpt2.tok.apply_chat_template(chat, tokenize=True, add_generation_prompt=gen, return_dict=False)
        assert ids == list(hf_ids)  # same ids as tokenizing the whole rendered text
        assert gpt2.encode(gpt2.apply_chat_template(chat, add_generation_prompt=gen), bos=True) == [gpt2.bos_id] + ids
        runs, cur = [], []
        for i, m in zip(ids + [None], mask + [False]):
            if m:
                cur.append(i)
            elif cur:
                runs.append(gpt2.decode(cur))
                cur = []
        assert runs == [m["content"] + "<|im_end|>\n" for m in chat if m["role"] == "assistant"]
    with pytest.raises(ValueError, match="starts with an assistant message"):
        gpt2.render_chat([{"role": "assistant", "content": "hi"}])
    gpt2.tok.chat_template = "{{ messages | length }}: {{ messages[-1]['content'] }}"  # rewrites earlier turns
    with pytest.raises(ValueError, match="not prefix-stable at message 1"):
        gpt2.render_chat(chat)


def test_tokenizer_job(corpus, tmp_path, capsys):
    out = tmp_path / "job-tok"
    rc = cli.main(["tokenizer", "--config", "tokenizer-tiny", "--set", f"input=[{corpus.parent}/*.txt]",
                   "--set", "vocab_size=700", "--set", f"out={out}", "--set", "model_max_length=256"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["vocab_size"] == 700 and summary["files"] == 1
    tok = load_tokenizer(out)
    assert isinstance(tok, SentencePieceTokenizer) and tok.vocab_size == 700 and tok.model_max_length == 256

    rc = tokenizer_job.main(["--set", f"input=[{tmp_path}/nope-*.txt]", "--set", f"out={out}"])
    assert rc == 2 and "matches no file" in capsys.readouterr().err
    rc = tokenizer_job.main(["--set", f"out={out}"])
    assert rc == 2 and "give at least one training file" in capsys.readouterr().err
    rc = tokenizer_job.main(["--set", f"input=[{corpus}]", "--set", "vocab_size=50"])
    assert rc == 2 and "vocab_size must exceed 264" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n", encoding="utf-8")
    rc = tokenizer_job.main(["--set", f"input=[{empty}]", "--set", f"out={tmp_path / 'x'}"])
    assert rc == 2 and "contain no text" in capsys.readouterr().err


@pytest.mark.vllm
def test_vllm_tokenizer_agrees(trained):
    """vLLM loads the saved directory through its own tokenizer registry: same ids, same chat text.

    No engine is started (the tokenizer is all that is under test); vLLM's chat endpoint tokenizes the rendered
    chat with add_special_tokens=False and its completions endpoint with True — both are checked here.
    """
    vllm_tokenizers = pytest.importorskip("vllm.tokenizers")
    tok, out = trained
    vt = vllm_tokenizers.get_tokenizer(str(out))
    for chat in CHATS:
        text = vt.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        assert text == tok.apply_chat_template(chat)
        assert vt.encode(text, add_special_tokens=False) == tok.render_chat(chat, add_generation_prompt=True)[0]
    for text in ROUND_TRIP:
        assert vt.encode(text, add_special_tokens=False) == tok.encode(text), repr(text)
        assert vt.encode(text) == tok.encode(text, bos=True), repr(text)
        assert vt.decode(tok.encode(text)) == text
