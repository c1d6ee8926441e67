"""The reference sampler against a cache-free, one-prompt-at-a-time argmax loop, plus its sampling rules."""

import dataclasses

import pytest
import torch

from model.llama import ModelArgs, build_model
from model.sampler import Completion, SamplingParams, generate, stream

VOCAB = 97
PROMPTS = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], [4], [40, 41, 42, 43, 44]]


class CharTokenizer:
    """A one-character-per-id tokenizer: enough of the Tokenizer protocol for stop strings and eos."""

    vocab_size = VOCAB
    bos_id, pad_id = None, None

    def __init__(self, eos_id: int | None = None):
        self.eos_id = eos_id

    def decode(self, ids):
        return "".join(chr(33 + i) for i in ids if i != self.eos_id)

    def encode(self, text, *, bos=False, eos=False):
        return [ord(c) - 33 for c in text]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls: one thread is faster, and does not collapse when the machine is shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=[2, 4], ids=["gqa", "mha"])
def model(request):
    args = ModelArgs.from_name("tiny", n_layers=2, vocab_size=VOCAB, n_kv_heads=request.param, max_seq_len=64)
    m = build_model(args).eval()
    return m.init_weights(std=0.3, seed=0)  # a wide init: peaked, non-degenerate logits


def reference_greedy(model, ids, n):
    """Full recompute every step, no cache, no padding: the ground truth."""
    ids, logps = list(ids), []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids]))[0, -1]
            ids.append(int(logits.argmax()))
            logps.append(float(logits.log_softmax(-1)[ids[-1]]))
    return ids[-n:], logps


def test_greedy_batched_mixed_lengths_equals_one_by_one_without_cache(model):
    out = generate(model, PROMPTS, SamplingParams(max_new_tokens=16, temperature=0, logprobs=True))
    assert [len(o) for o in out] == [1] * len(PROMPTS)
    for ids, (c,) in zip(PROMPTS, out):
        ref, ref_logps = reference_greedy(model, ids, 16)
        assert c.token_ids == ref
        assert c.finish_reason == "length" and c.text is None
        torch.testing.assert_close(torch.tensor(c.logprobs), torch.tensor(ref_logps), atol=1e-4, rtol=0)
        assert c.cumulative_logprob == pytest.approx(sum(ref_logps), abs=1e-3)
    assert len({tuple(o[0].token_ids) for o in out}) == len(PROMPTS)  # not a degenerate model
    assert max(len(set(o[0].token_ids)) for o in out) > 3


def test_rows_that_stop_early_drop_out_without_disturbing_the_others(model):
    refs = [reference_greedy(model, p, 12)[0] for p in PROMPTS]
    stop_tok = refs[1][2]  # prompt 1 stops at its 3rd token
    params = [SamplingParams(max_new_tokens=12, temperature=0) for _ in PROMPTS]
    params[1] = dataclasses.replace(params[1], stop_token_ids=(stop_tok,))
    params[2] = dataclasses.replace(params[2], max_new_tokens=4)
    out = generate(model, PROMPTS, params)
    assert out[1][0].token_ids == refs[1][:3] and out[1][0].finish_reason == "stop"
    assert out[1][0].stop_reason == stop_tok
    assert out[2][0].token_ids == refs[2][:4] and out[2][0].finish_reason == "length"
    assert out[0][0].token_ids == refs[0] and out[3][0].token_ids == refs[3]


def test_same_seed_same_samples_whatever_the_batch(model):
    p = SamplingParams(max_new_tokens=12, temperature=1.0, seed=7, n=2)
    alone = generate(model, [PROMPTS[1]], p)[0]
    others = [SamplingParams(max_new_tokens=5, temperature=0.7, top_k=10, seed=3),
              p,
              SamplingParams(max_new_tokens=12, temperature=0),
              SamplingParams(max_new_tokens=3, temperature=1.5, n=3)]
    mixed = generate(model, PROMPTS, others)[1]
    assert [c.token_ids for c in alone] == [c.token_ids for c in mixed]
    assert alone[0].token_ids != alone[1].token_ids  # the n samples are independent draws
    other_seed = generate(model, [PROMPTS[1]], dataclasses.replace(p, seed=8))[0]
    assert [c.token_ids for c in other_seed] != [c.token_ids for c in alone]


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.3, top_k=1, seed=0, max_new_tokens=10),
                                    SamplingParams(temperature=2.0, top_p=1e-6, seed=0, max_new_tokens=10)],
                         ids=["top_k=1", "top_p~0"])
def test_top_k_1_and_tiny_top_p_equal_greedy(model, params):
    greedy = generate(model, PROMPTS, SamplingParams(max_new_tokens=10, temperature=0))
    sampled = generate(model, PROMPTS, params)
    assert [o[0].token_ids for o in sampled] == [o[0].token_ids for o in greedy]


def test_sampled_frequencies_follow_the_filtered_distribution(model):
    """4000 first tokens from one prompt (prefilled once, n rows): only the top-k appear, at softmax(l/T) rates."""
    prompt, T, k, n = PROMPTS[3], 1.5, 4, 4000
    with torch.no_grad():
        logits = model(torch.tensor([prompt]))[0, -1] / T
    top = logits.topk(k)
    expected = top.values.softmax(-1)
    out = generate(model, [prompt], SamplingParams(max_new_tokens=1, temperature=T, top_k=k, n=n, seed=1))[0]
    assert len(out) == n and sorted(c.index for c in out) == list(range(n))
    firsts = torch.tensor([c.token_ids[0] for c in out])
    assert set(firsts.tolist()) <= set(top.indices.tolist())
    freq = torch.stack([(firsts == t).float().mean() for t in top.indices])
    torch.testing.assert_close(freq, expected, atol=0.03, rtol=0)  # ~4 σ at n=4000


def test_top_p_keeps_the_smallest_nucleus(model):
    prompt = PROMPTS[0]
    with torch.no_grad():
        probs = model(torch.tensor([prompt]))[0, -1].softmax(-1)
    sorted_p, order = probs.sort(descending=True)
    p = float(sorted_p[:2].sum()) - 1e-4  # the nucleus is exactly the top-2 tokens
    out = generate(model, [prompt], SamplingParams(max_new_tokens=1, temperature=1, top_p=p, n=600, seed=2))[0]
    assert {c.token_ids[0] for c in out} == set(order[:2].tolist())


def test_stop_string_cuts_text_before_it(model):
    ref = reference_greedy(model, PROMPTS[0], 12)[0]
    tok = CharTokenizer()
    full = tok.decode(ref)
    stop = full[4:6]
    first = full.find(stop)
    out = generate(model, [PROMPTS[0]], SamplingParams(max_new_tokens=12, temperature=0, stop=["\x00never", stop]),
                   tokenizer=tok)[0][0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == full[:first]  # OpenAI semantics: the stop string itself is left out
    assert out.token_ids == ref[:first + len(stop)]
    no_stop = generate(model, [PROMPTS[0]], SamplingParams(max_new_tokens=12, temperature=0), tokenizer=tok)[0][0]
    assert no_stop.text == full and no_stop.finish_reason == "length"


def test_eos_stops_unless_ignored(model):
    ref = reference_greedy(model, PROMPTS[2], 10)[0]
    eos = ref[3]
    cut = ref.index(eos)
    tok = CharTokenizer(eos_id=eos)
    out = generate(model, [PROMPTS[2]], SamplingParams(max_new_tokens=10, temperature=0), tokenizer=tok)[0][0]
    assert out.token_ids == ref[:cut + 1] and out.finish_reason == "stop"
    assert out.text == CharTokenizer().decode(ref[:cut])  # eos kept in ids, not in text
    ignored = generate(model, [PROMPTS[2]], SamplingParams(max_new_tokens=10, temperature=0, ignore_eos=True),
                       tokenizer=tok)[0][0]
    assert ignored.token_ids == ref and ignored.finish_reason == "length"


def test_n_per_prompt_shapes_and_order(model):
    params = [SamplingParams(max_new_tokens=5, n=3, seed=1), SamplingParams(max_new_tokens=7, n=1, seed=1),
              SamplingParams(max_new_tokens=2, n=2, temperature=0)]
    out = generate(model, PROMPTS[:3], params)
    assert [len(o) for o in out] == [3, 1, 2]
    for i, o in enumerate(out):
        assert all(isinstance(c, Completion) for c in o)
        assert [c.prompt_index for c in o] == [i] * len(o) and [c.index for c in o] == list(range(len(o)))
        assert all(len(c.token_ids) == params[i].max_new_tokens for c in o)
    assert out[2][0].token_ids == out[2][1].token_ids  # greedy samples agree


def test_stream_deltas_add_up_to_generate(model):
    tok = CharTokenizer()
    ref = tok.decode(reference_greedy(model, PROMPTS[1], 10)[0])
    params = SamplingParams(max_new_tokens=10, temperature=0, stop=[ref[6:8]])
    steps = list(stream(model, PROMPTS[:2], params, tokenizer=tok))
    assert 1 <= len(steps) <= 10 and all(1 <= len(s) <= 2 for s in steps)
    done = generate(model, PROMPTS[:2], params, tokenizer=tok)
    for i in range(2):
        mine = [d for s in steps for d in s if d.prompt_index == i]
        assert [d.token_id for d in mine] == done[i][0].token_ids
        assert "".join(d.text for d in mine) == done[i][0].text
        assert [d.finish_reason for d in mine][-1] == done[i][0].finish_reason
        assert all(d.finish_reason is None for d in mine[:-1])
    assert done[1][0].text == ref[:ref.find(ref[6:8])]


@pytest.mark.parametrize(("field", "value"), [
    ("temperature", -0.1), ("temperature", float("nan")), ("temperature", float("inf")),
    ("top_p", 0.0), ("top_p", 1.5), ("top_k", -1), ("max_new_tokens", 0), ("n", 0),
    ("stop", [""]), ("stop_token_ids", [-3]), ("seed", 1.5),
])
def test_sampling_params_reject_nonsense_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"SamplingParams\.{field}"):
        SamplingParams(**{field: value})


def test_bad_requests_get_clear_errors(model):
    with pytest.raises(ValueError, match="max_seq_len=64"):
        generate(model, [[1] * 60], SamplingParams(max_new_tokens=5))
    with pytest.raises(ValueError, match="no tokenizer"):
        generate(model, [[1]], SamplingParams(max_new_tokens=5, stop=["x"]))
    with pytest.raises(ValueError, match=r"prompts\[1\].*outside"):
        generate(model, [[1], [VOCAB]], SamplingParams(max_new_tokens=5))
    with pytest.raises(ValueError, match=r"prompts\[0\] must be a non-empty"):
        generate(model, [[]], SamplingParams(max_new_tokens=5))
    with pytest.raises(ValueError, match="2 SamplingParams for 1 prompts"):
        generate(model, [[1]], [SamplingParams(), SamplingParams()])
    # exactly at the limit is fine
    out = generate(model, [[1] * 59], SamplingParams(max_new_tokens=5, temperature=0))
    assert len(out[0][0].token_ids) == 5


# ------------------------------------------------------------------------------------------ the generate job


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny random model with a real SentencePiece tokenizer, exported as an HF directory."""
    from model.hf import save_hf
    from model.tokenizer import SentencePieceTokenizer

    d = tmp_path_factory.mktemp("gen")
    corpus = d / "corpus.txt"
    corpus.write_text("\n".join(f"the {a} cat sat on the {b} mat {i} times" for i, (a, b) in
                                enumerate([("red", "blue"), ("big", "small"), ("old", "new")] * 40)))
    with pytest.warns(UserWarning):  # the corpus is too small for 400 ids
        tok = SentencePieceTokenizer.train([corpus], vocab_size=400)
    args = ModelArgs.from_name("tiny", n_layers=2, vocab_size=512)  # padded past the tokenizer
    save_hf(build_model(args).init_weights(std=0.2, seed=0), tok, d / "hf")
    return d / "hf"


def test_generate_job_prints_the_samplers_completions(hf_dir, capsys):
    import json

    from jobs.cli import main as cli_main
    from model.hf import load_hf

    rc = cli_main(["generate", "--set", f"model={hf_dir}", "--set", "prompt=[the red cat, a]",
                   "--set", "temperature=0", "--set", "max_new_tokens=10", "--set", "json=true", "--set", "n=2"])
    assert rc == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [(x["prompt_index"], x["sample"]) for x in lines] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    model, tok = load_hf(hf_dir)
    assert all(i < tok.vocab_size for x in lines for i in x["token_ids"])  # padded ids are never sampled
    direct = generate(model, [tok.encode("the red cat", bos=True)], SamplingParams(max_new_tokens=10, temperature=0),
                      tokenizer=tok)[0][0]
    assert lines[0]["token_ids"] == lines[1]["token_ids"] == direct.token_ids
    assert lines[0]["text"] == direct.text and lines[0]["finish_reason"] == direct.finish_reason

    rc = cli_main(["generate", "--set", f"model={hf_dir}", "--set", "prompt=hello", "--set", "chat=true",
                   "--set", "max_new_tokens=4", "--set", "seed=3"])
    out = capsys.readouterr().out
    assert rc == 0 and out.startswith("--- prompt 0 sample 0 (")


@pytest.mark.parametrize(("overrides", "message"), [
    (["prompt=hi"], "generate.model: give the HF model directory"),
    (["model={dir}", "prompt=hi", "top_p=0"], "generate.top_p"),
    (["model={dir}", "prompt=hi", "temperature=-1"], "generate.temperature"),
    (["model={dir}"], "generate.prompt"),
    (["model={dir}", "prompt=hi", "max_new_tokens=600"], "max_seq_len=512"),
    (["model={dir}/nope", "prompt=hi"], "nope"),
])
def test_generate_job_rejects_bad_settings(hf_dir, capsys, overrides, message):
    from jobs.generate import main as job_main

    argv = [a for o in overrides for a in ("--set", o.format(dir=hf_dir))]
    assert job_main(argv) == 2
    assert message in capsys.readouterr().err
