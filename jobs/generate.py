"""Sample from an HF Llama directory with the reference sampler (model/sampler.py) and print the completions.

Runbook::

    llamaray generate --set model=runs/sft/hf --set prompt="Once upon a time" --set max_new_tokens=48
    # a chat turn (the tokenizer's chat template; stops at the end-of-turn marker), greedy:
    llamaray generate --set model=runs/sft/hf --set chat=true --set prompt="What is 17 + 25?" --set temperature=0
    # several prompts, 4 samples each, one JSON line per completion, as `ray job submit` runs it:
    python -m jobs.generate --set model=runs/sft/hf --set 'prompt=[a cat, a dog]' --set n=4 --set json=true

Plain output prints each completion's text after a ``--- prompt i sample j (finish_reason)`` header;
``json=true`` prints one JSON object per completion (prompt, text, token_ids, finish_reason, cumulative_logprob).

What it leaves out: it runs in this process on the CPU (or ``device=cuda``) with no Ray and no vLLM — it is the
reference for correctness, not a server (``llamaray serve`` is). Prompts longer than the model's context with
``max_new_tokens`` are rejected, not truncated. Without a tokenizer in the directory it cannot run (prompts are text).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from core.config import ConfigError, run_job


@dataclass
class GenerateConfig:
    """Settings of ``llamaray generate``."""

    model: Path | None = None
    """HF Llama directory (config.json, model.safetensors, tokenizer files), e.g. the output of ``llamaray export``."""
    prompt: str | list[str] = field(default_factory=list)
    """One prompt or a list of prompts (text)."""
    chat: bool = False
    """Wrap each prompt as a user turn with the tokenizer's chat template and stop at the end of the assistant turn."""
    system: str | None = None
    """Optional system message for chat=true."""
    max_new_tokens: int = 64
    """Most tokens to generate per completion."""
    temperature: float = 0.7
    """Softmax temperature; 0 is greedy."""
    top_k: int = 0
    """Sample from the k most likely tokens only; 0 turns it off."""
    top_p: float = 1.0
    """Nucleus sampling mass in (0, 1]; 1 turns it off."""
    n: int = 1
    """Completions per prompt."""
    seed: int | None = 0
    """Seed of each request's random stream (null: a fresh one every run)."""
    stop: list[str] = field(default_factory=list)
    """Stop strings; the text is cut before the first one found."""
    ignore_eos: bool = False
    """Keep generating past the end-of-sequence token."""
    device: str = "cpu"
    """torch device to run on."""
    dtype: str | None = None
    """Cast the weights on load (float32, bfloat16, …); null keeps the stored dtype."""
    json: bool = False
    """Print one JSON line per completion instead of plain text."""

    def __post_init__(self) -> None:
        if self.model is None:
            raise ConfigError("generate.model: give the HF model directory, e.g. --set model=runs/sft/hf")
        if isinstance(self.prompt, str):
            self.prompt = [self.prompt]
        if not self.prompt or any(not isinstance(p, str) or not p for p in self.prompt):
            raise ConfigError('generate.prompt: give a non-empty prompt, e.g. --set prompt="Once upon a time"')
        if self.system is not None and not self.chat:
            raise ConfigError("generate.system: a system message needs chat=true")
        # the sampler's own validation, reported with this config's field names
        try:
            self.sampling_params(stop_token_ids=())
        except ValueError as e:
            raise ConfigError(str(e).replace("SamplingParams.", "generate.")) from e

    def sampling_params(self, *, stop_token_ids: tuple[int, ...]):
        from model.sampler import SamplingParams

        return SamplingParams(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_k=self.top_k,
                              top_p=self.top_p, stop=tuple(self.stop), stop_token_ids=stop_token_ids,
                              ignore_eos=self.ignore_eos, n=self.n, seed=self.seed)


def run(cfg: GenerateConfig) -> list[dict]:
    """Load the model, encode the prompts, sample; one dict per completion (prompt order, then sample order)."""
    from model.hf import load_hf
    from model.sampler import generate

    model, tok = load_hf(cfg.model, device=cfg.device, dtype=cfg.dtype)
    if tok is None:
        raise ConfigError(f"generate.model: {cfg.model} has no tokenizer files (tokenizer.model / tokenizer.json)")
    stop_ids: tuple[int, ...] = ()
    if cfg.chat:
        prompts = []
        for p in cfg.prompt:
            messages = ([{"role": "system", "content": cfg.system}] if cfg.system else []) + \
                [{"role": "user", "content": p}]
            prompts.append(tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True)))
        # our SentencePiece tokenizer also ends a turn with <|end|>; HF tokenizers end it with eos
        stop_ids = tuple(i for i in getattr(tok, "stop_ids", ()) if i != tok.eos_id)
    else:
        prompts = [tok.encode(p, bos=tok.bos_id is not None) for p in cfg.prompt]
    out = generate(model, prompts, cfg.sampling_params(stop_token_ids=stop_ids), tokenizer=tok)
    return [{"prompt_index": c.prompt_index, "sample": c.index, "prompt": cfg.prompt[c.prompt_index],
             "text": c.text, "token_ids": c.token_ids, "finish_reason": c.finish_reason,
             "cumulative_logprob": round(c.cumulative_logprob, 4)}
            for row in out for c in row]


def show(results: list[dict], cfg: GenerateConfig) -> None:
    for r in results:
        if cfg.json:
            print(json.dumps(r, ensure_ascii=False))
        else:
            print(f"--- prompt {r['prompt_index']} sample {r['sample']} ({r['finish_reason']})")
            print(r["prompt"] + r["text"] if not cfg.chat else r["text"])


def main(argv: list[str] | None = None) -> int:
    return run_job("generate", __doc__, argv, GenerateConfig, run, show=show, errors=(ValueError, FileNotFoundError))


if __name__ == "__main__":
    sys.exit(main())
