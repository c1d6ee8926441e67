"""Sample from an HF Llama directory with an engine of ``actors/engines/`` (the reference sampler of
model/sampler.py by default) and print the completions.

Runbook::

    llamaray generate --set model=runs/sft/hf --set prompt="Once upon a time" --set max_new_tokens=48
    # a chat turn (the tokenizer's chat template; stops at the end-of-turn marker), greedy:
    llamaray generate --set model=runs/sft/hf --set chat=true --set prompt="What is 17 + 25?" --set temperature=0
    # several prompts, 4 samples each, one JSON line per completion, as `ray job submit` runs it:
    python -m jobs.generate --set model=runs/sft/hf --set 'prompt=[a cat, a dog]' --set n=4 --set json=true

Plain output prints each completion's text after a ``--- prompt i sample j (finish_reason)`` header;
``json=true`` prints one JSON object per completion (prompt, text, token_ids, finish_reason, cumulative_logprob).

What it leaves out: it runs in this process on the CPU (or ``engine_options.device=cuda``) with no Ray — it is the
reference for correctness, not a server (``llamaray serve`` is). Prompts longer than the model's context with
``max_new_tokens`` are rejected, not truncated. Without a tokenizer in the directory it cannot run (prompts are text).
Samples end at the tokenizer's stop ids (end of sequence, and our tokenizer's end-of-turn marker) unless
``ignore_eos``.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import sys
from dataclasses import dataclass, field
from pathlib import Path

from actors.engines import EngineOptions, GenParams, engine_cls
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
    top_k: int | None = None
    """Sample from the k most likely tokens only; null turns it off."""
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
    engine: str = "reference"
    """A registered engine (actors/engines/): reference (the sampler of model/sampler.py) or vllm."""
    engine_options: EngineOptions = field(default_factory=lambda: EngineOptions(device="cpu"))
    """Engine settings (device, dtype, …; actors/engines/base.py); ones the engine cannot honour are refused — the
    default device "cpu" is the reference engine's, so engine=vllm also needs engine_options.device=null."""
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
        try:  # the one sampling type's validation, reported with this config's field names
            self.sampling_params()
        except ConfigError as e:
            raise ConfigError(str(e).replace("sampling.", "generate.")) from e

    def sampling_params(self) -> GenParams:
        return GenParams(n=self.n, max_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                         top_k=self.top_k, stop=tuple(self.stop), ignore_eos=self.ignore_eos,
                         seed=self.seed if self.seed is not None else secrets.randbits(31))


def run(cfg: GenerateConfig) -> list[dict]:
    """Start the engine, encode the prompts, sample; one dict per completion (prompt order, then sample order)."""
    from model.tokenizer import load_tokenizer

    tok = load_tokenizer(cfg.model)  # FileNotFoundError naming the directory when it has no tokenizer
    if cfg.chat:
        system = [{"role": "system", "content": cfg.system}] if cfg.system else []
        prompts = [tok.encode(tok.apply_chat_template(system + [{"role": "user", "content": p}],
                                                      add_generation_prompt=True)) for p in cfg.prompt]
    else:
        prompts = [tok.encode(p, bos=tok.bos_id is not None) for p in cfg.prompt]
    engine = engine_cls(cfg.engine)(str(cfg.model), cfg.engine_options)
    asyncio.run(engine.start())
    try:
        out = engine.generate(prompts, cfg.sampling_params())
    finally:
        asyncio.run(engine.shutdown())
    return [{"prompt_index": i, "sample": j, "prompt": cfg.prompt[i], "text": c.text, "token_ids": c.token_ids,
             "finish_reason": c.finish_reason,
             "cumulative_logprob": None if c.cumulative_logprob is None else round(c.cumulative_logprob, 4)}
            for i, row in enumerate(out) for j, c in enumerate(row)]


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
