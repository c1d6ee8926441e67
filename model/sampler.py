"""The reference sampler: batched autoregressive decoding with a KV cache, in plain PyTorch.

``generate(model, prompts, params, tokenizer=tok)`` returns, for each prompt, ``params.n`` ``Completion``s.
``stream(...)`` is the same loop yielding one list of per-token ``Delta``s per decode step (for a server).

How a batch runs:
  1. Prompts are left-padded to the longest one. Prefill builds a (B, 1, P, P) boolean mask (causal ∧ key is not
     padding; each position may always see itself so that pad rows stay finite) and pad-aware positions
     (the first real token of every prompt is position 0), so a padded prompt computes exactly what it would alone.
  2. Each prompt is prefilled once; for ``n > 1`` its cache rows are then copied n times (shared prefix).
  3. Decode feeds one token per live row per step; the (B, 1, 1, S) mask hides the left padding.
     Rows that finish (eos / stop token / stop string / max_new_tokens) are dropped from the batch
     (``KVCache.select``), so they stop costing compute.

Sampling (per row, so one batch may mix requests): temperature 0 is greedy (argmax); otherwise
logits / temperature → top-k → top-p (nucleus) → one draw from a per-sequence ``torch.Generator``. The generator of
sample j of a request is seeded from (params.seed, j) only, so the same seed gives the same tokens whatever else is in
the batch. ``seed=None`` draws a fresh seed from torch's global RNG.

Stops (OpenAI / vLLM semantics): eos (unless ``ignore_eos``) and ``stop_token_ids`` end a sequence with
finish_reason "stop"; the stop token is kept in ``token_ids`` but not in ``text``. A stop string ends it too and the
text is cut before the stop string (the string itself is excluded). ``max_new_tokens`` reached → "length".

With a tokenizer smaller than the model's (padded) vocabulary, ids the tokenizer cannot decode are masked out.
Over-long requests: prompt length + max_new_tokens > model.args.max_seq_len raises ValueError (no silent clamping).
Logprobs are the model's own log-probabilities (log_softmax of the raw logits, before temperature/top-k/top-p).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from model.llama import KVCache, Transformer

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one request (one prompt)."""

    max_new_tokens: int = 64
    """Most tokens to generate per sample (the stop token, if any, counts)."""
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy (argmax), ignoring top_k, top_p and seed."""
    top_k: int | None = None
    """Keep only the k most likely tokens before sampling; 0 or None turns it off."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability sums to ≥ top_p; 1 turns it off."""
    stop: tuple[str, ...] = ()
    """Stop strings: generation ends when the text contains one; the text is cut before it (needs a tokenizer)."""
    stop_token_ids: tuple[int, ...] = ()
    """Token ids that end generation (in addition to eos); kept in token_ids, left out of text."""
    ignore_eos: bool = False
    """Keep generating past the tokenizer's eos token (benchmarks, parity tests)."""
    n: int = 1
    """Number of independent samples for this prompt (the prompt is prefilled once and shared)."""
    seed: int | None = None
    """Seed of this request's random stream; the same seed gives the same samples whatever the batch holds."""
    logprobs: bool = False
    """Record the log-probability of each generated token in Completion.logprobs."""

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"SamplingParams.{name}: {why}, got {getattr(self, name)!r}")

        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise bad("max_new_tokens", "must be an integer ≥ 1")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                or not math.isfinite(self.temperature) or self.temperature < 0:
            raise bad("temperature", "must be a finite number ≥ 0 (0 = greedy)")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int)
                                       or self.top_k < 0):
            raise bad("top_k", "must be an integer ≥ 0 (0 or None = off)")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) \
                or not math.isfinite(self.top_p) or not 0 < self.top_p <= 1:
            raise bad("top_p", "must be in (0, 1] (1 = off)")
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise bad("n", "must be an integer ≥ 1")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise bad("seed", "must be an integer or None")
        if isinstance(self.stop, str):  # a lone string is a common slip: treat it as one stop string
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise bad("stop", "must be a list of non-empty strings")
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "must be a list of non-negative integers")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Completion:
    """One generated sample."""

    prompt_index: int
    """Which prompt (position in the ``prompts`` list) this continues."""
    index: int
    """Which of the request's n samples this is (0 … n-1)."""
    token_ids: list[int]
    """Generated ids (not the prompt); a final eos / stop token is included."""
    finish_reason: FinishReason
    """"stop" (eos, stop token or stop string) or "length" (max_new_tokens reached)."""
    text: str | None = None
    """Decoded text without the stop token and cut before a stop string; None without a tokenizer."""
    cumulative_logprob: float = 0.0
    """Sum of the model's log-probabilities of token_ids."""
    logprobs: list[float] | None = None
    """Per-token log-probabilities (when SamplingParams.logprobs)."""
    stop_reason: int | str | None = None
    """The stop token id or stop string that ended the sample (None for eos-free length stops)."""


@dataclass
class Delta:
    """What one decode step added to one sample (``stream``)."""

    prompt_index: int
    index: int
    token_id: int
    """The token sampled at this step."""
    text: str = ""
    """New text that is now final (held back while it could still be the start of a stop string)."""
    finish_reason: FinishReason | None = None
    """Set on the sample's last delta."""
    logprob: float = 0.0
    """The model's log-probability of token_id."""
    stop_reason: int | str | None = None
    """On the last delta: the stop token id or stop string that ended the sample, if any."""


@dataclass
class _Seq:
    """Book-keeping of one running sample."""

    prompt_index: int
    index: int
    params: SamplingParams
    prompt_len: int
    generator: torch.Generator | None
    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    text: str = ""  # decoded text so far (cut at a stop string once found)
    emitted: int = 0  # characters of text already streamed
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None


def _seed_for(seed: int, index: int) -> int:
    """A distinct 63-bit seed for sample ``index`` of a request seeded ``seed`` (splitmix-style mixing)."""
    x = (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) % (1 << 64)
    x ^= x >> 31
    return x % (1 << 63)


def _check_inputs(model: Transformer, prompts: Sequence[Sequence[int]],
                  params: SamplingParams | Sequence[SamplingParams], tokenizer) -> list[SamplingParams]:
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("generate: prompts must be a non-empty list of token-id lists")
    if isinstance(params, SamplingParams):
        plist = [params] * len(prompts)
    else:
        plist = list(params)
        if len(plist) != len(prompts):
            raise ValueError(f"generate: {len(plist)} SamplingParams for {len(prompts)} prompts; "
                             "pass one for all or one per prompt")
        if not all(isinstance(p, SamplingParams) for p in plist):
            raise ValueError("generate: params must be SamplingParams (or a list of them)")
    V, max_len = model.args.vocab_size, model.args.max_seq_len
    for i, (ids, p) in enumerate(zip(prompts, plist)):
        if not isinstance(ids, (list, tuple)) or not ids:
            raise ValueError(f"generate: prompts[{i}] must be a non-empty list of token ids")
        if any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < V for t in ids):
            raise ValueError(f"generate: prompts[{i}] holds a token id outside [0, {V})")
        if len(ids) + p.max_new_tokens > max_len:
            raise ValueError(f"generate: prompts[{i}] has {len(ids)} tokens + max_new_tokens={p.max_new_tokens} "
                             f"> the model's max_seq_len={max_len}; shorten the prompt or lower max_new_tokens")
        if p.stop and tokenizer is None:
            raise ValueError(f"generate: prompts[{i}] sets stop strings {list(p.stop)} but no tokenizer was given")
    return plist


def _sample(logits: Tensor, seqs: list[_Seq]) -> Tensor:
    """One token id per row of ``logits`` (B, V), each row with its own params and generator.  # (B,)"""
    out = logits.argmax(dim=-1)  # greedy rows are done
    rows = [i for i, s in enumerate(seqs) if not s.params.greedy]
    if not rows:
        return out
    idx = torch.tensor(rows, device=logits.device)
    x = logits[idx]  # (b, V)
    temp = torch.tensor([seqs[i].params.temperature for i in rows], device=x.device, dtype=x.dtype)
    x = x / temp[:, None]
    top_k = torch.tensor([seqs[i].params.top_k or 0 for i in rows], device=x.device)
    top_p = torch.tensor([seqs[i].params.top_p for i in rows], device=x.device, dtype=x.dtype)
    sorted_x, order = x.sort(dim=-1, descending=True)  # (b, V)
    rank = torch.arange(x.shape[-1], device=x.device)[None]  # (1, V)
    drop = (top_k[:, None] > 0) & (rank >= top_k[:, None])
    probs = sorted_x.masked_fill(drop, float("-inf")).softmax(dim=-1)
    # nucleus: drop a token when the mass strictly before it already reaches top_p (the top token always stays)
    before = probs.cumsum(dim=-1) - probs
    probs = probs.masked_fill(before >= top_p[:, None], 0.0)
    # inverse-CDF draw with one uniform per row from that row's own generator
    u = torch.stack([torch.rand((), generator=seqs[i].generator, device=x.device) for i in rows])  # (b,)
    cdf = probs.cumsum(dim=-1)
    pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).clamp_(max=x.shape[-1] - 1)  # (b, 1)
    # never land on a zero-probability token (rounding at the tail of the cdf)
    pick = torch.minimum(pick, (probs > 0).sum(-1, keepdim=True) - 1)
    out[idx] = order.gather(-1, pick).squeeze(-1)
    return out


@torch.inference_mode()
def stream(model: Transformer, prompts: Sequence[Sequence[int]],
           params: SamplingParams | Sequence[SamplingParams], *, tokenizer=None,
           eos_id: int | None = None) -> Iterator[list[Delta]]:
    """Decode step by step, yielding the deltas of every live sample after each step.

    ``eos_id`` defaults to ``tokenizer.eos_id``; without either, only stop tokens and length end a sample.
    """
    plist = _check_inputs(model, prompts, params, tokenizer)
    if eos_id is None and tokenizer is not None:
        eos_id = tokenizer.eos_id
    device = model.output.weight.device
    dtype = model.output.weight.dtype
    args = model.args
    B0 = len(prompts)
    lens = torch.tensor([len(p) for p in prompts], device=device)
    P = int(lens.max())
    capacity = P + max(p.max_new_tokens for p in plist)

    # ---- prefill: every prompt once, left-padded
    pad = P - lens  # (B0,)
    tokens = torch.zeros(B0, P, dtype=torch.long, device=device)
    for i, ids in enumerate(prompts):
        tokens[i, P - len(ids):] = torch.tensor(ids, dtype=torch.long)
    col = torch.arange(capacity, device=device)
    valid = col[None] >= pad[:, None]  # (B0, capacity): False on the left padding
    positions = (col[None, :P] - pad[:, None]).clamp(min=0)  # (B0, P): real tokens start at 0
    causal = torch.ones(P, P, dtype=torch.bool, device=device).tril()  # (P, P)
    mask = causal[None] & valid[:, None, :P]  # (B0, P, P)
    mask = (mask | torch.eye(P, dtype=torch.bool, device=device)[None])[:, None]  # (B0, 1, P, P)
    cache = KVCache.empty(args, B0, capacity, device=device, dtype=dtype)
    h = model.hidden_states(tokens, positions, cache, mask)[:, -1]  # (B0, dim): last prompt token
    logits = model.output(h).float()  # (B0, V)
    # a model vocabulary padded past the tokenizer's: never sample an id the tokenizer cannot decode
    decodable = tokenizer.vocab_size if tokenizer is not None and tokenizer.vocab_size < args.vocab_size else None
    if decodable is not None:
        logits[:, decodable:] = float("-inf")

    # ---- n samples per prompt: copy each prompt's cache rows n times
    seqs: list[_Seq] = []
    rows: list[int] = []
    for i, p in enumerate(plist):
        base = p.seed if p.seed is not None else int(torch.randint(0, 2**62, ()).item())
        for j in range(p.n):
            gen = None
            if not p.greedy:
                gen = torch.Generator(device=device).manual_seed(_seed_for(base, j))
            seqs.append(_Seq(i, j, p, len(prompts[i]), gen))
            rows.append(i)
    if len(rows) != B0:
        sel = torch.tensor(rows, device=device)
        cache.select(sel)
        logits, valid, lens = logits[sel], valid[sel], lens[sel]
    next_pos = lens.clone()  # (B,) position of the token about to be fed
    max_stop = {id(s.params): max((len(x) for x in s.params.stop), default=0) for s in seqs}

    while seqs:
        logp = torch.log_softmax(logits, dim=-1) if any(s.params.logprobs for s in seqs) else None
        chosen = _sample(logits, seqs)  # (B,)
        if logp is None:  # the cumulative logprob is always kept: cheap for the chosen tokens only
            logp_chosen = (logits.gather(-1, chosen[:, None]).squeeze(-1) - logits.logsumexp(-1)).tolist()
        else:
            logp_chosen = logp.gather(-1, chosen[:, None]).squeeze(-1).tolist()
        chosen_list = chosen.tolist()
        deltas: list[Delta] = []
        keep: list[int] = []
        for r, s in enumerate(seqs):
            tok = chosen_list[r]
            s.ids.append(tok)
            s.logprobs.append(logp_chosen[r])
            p = s.params
            if eos_id is not None and tok == eos_id and not p.ignore_eos:
                s.finish_reason, s.stop_reason = "stop", None
            elif tok in p.stop_token_ids:
                s.finish_reason, s.stop_reason = "stop", tok
            new_text = ""
            if tokenizer is not None:
                body = s.ids[:-1] if s.finish_reason == "stop" else s.ids
                old_len = len(s.text)
                s.text = tokenizer.decode(body)
                if p.stop and s.finish_reason is None:
                    start = max(0, old_len - max_stop[id(p)] + 1)
                    hits = [(s.text.find(x, start), x) for x in p.stop]
                    hits = [(at, x) for at, x in hits if at >= 0]
                    if hits:
                        at, x = min(hits)
                        s.text = s.text[:at]
                        s.finish_reason, s.stop_reason = "stop", x
                if s.finish_reason is None and len(s.ids) >= p.max_new_tokens:
                    s.finish_reason = "length"
                # stream only text that cannot turn out to be the start of a stop string
                hold = 0 if s.finish_reason is not None else max(0, max_stop[id(p)] - 1)
                final = len(s.text) - hold
                while s.finish_reason is None and final > s.emitted and s.text[final - 1] == "\ufffd":
                    final -= 1  # an incomplete UTF-8 character may still change: hold it back
                final = max(s.emitted, final)
                new_text, s.emitted = s.text[s.emitted:final], final
            elif s.finish_reason is None and len(s.ids) >= p.max_new_tokens:
                s.finish_reason = "length"
            deltas.append(Delta(s.prompt_index, s.index, tok, new_text, s.finish_reason, logp_chosen[r],
                                s.stop_reason))
            if s.finish_reason is None:
                keep.append(r)
        yield deltas
        if not keep:
            break
        if len(keep) != len(seqs):  # drop finished rows: they stop costing compute
            sel = torch.tensor(keep, device=device)
            cache.select(sel)
            valid, next_pos, chosen = valid[sel], next_pos[sel], chosen[sel]
            seqs = [seqs[r] for r in keep]
        S = cache.length + 1
        step_mask = valid[:, None, None, :S]  # (B, 1, 1, S)
        h = model.hidden_states(chosen[:, None], next_pos[:, None], cache, step_mask)[:, -1]  # (B, dim)
        logits = model.output(h).float()  # (B, V)
        if decodable is not None:
            logits[:, decodable:] = float("-inf")
        next_pos += 1


def generate(model: Transformer, prompts: Sequence[Sequence[int]],
             params: SamplingParams | Sequence[SamplingParams], *, tokenizer=None,
             eos_id: int | None = None) -> list[list[Completion]]:
    """``params.n`` completions for each prompt (token-id lists), in prompt order then sample order."""
    plist = _check_inputs(model, prompts, params, tokenizer)
    acc: dict[tuple[int, int], Completion] = {}
    texts: dict[tuple[int, int], list[str]] = {}
    for deltas in stream(model, prompts, plist, tokenizer=tokenizer, eos_id=eos_id):
        for d in deltas:
            key = (d.prompt_index, d.index)
            c = acc.get(key)
            if c is None:
                c = acc[key] = Completion(d.prompt_index, d.index, [], "length",
                                          "" if tokenizer is not None else None,
                                          logprobs=[] if plist[d.prompt_index].logprobs else None)
                texts[key] = []
            c.token_ids.append(d.token_id)
            c.cumulative_logprob += d.logprob
            if c.logprobs is not None:
                c.logprobs.append(d.logprob)
            texts[key].append(d.text)
            if d.finish_reason is not None:
                c.finish_reason, c.stop_reason = d.finish_reason, d.stop_reason
    out: list[list[Completion]] = []
    for i, p in enumerate(plist):
        row = []
        for j in range(p.n):
            c = acc[(i, j)]
            if tokenizer is not None:
                c.text = "".join(texts[(i, j)])
            row.append(c)
        out.append(row)
    return out
