"""OpenAI requests → engine inputs: the checkpoint's tokenizer (``PromptCodec``) and one ``Choice`` per sample."""

from __future__ import annotations

from actors.engines import GenParams, ModelInfo
from actors.openai_schema import APIError, ChatRequest, CompletionRequest, check_context
from actors.stream_batcher import Choice


class PromptCodec:
    """Text → token ids and chat messages → token ids, with the checkpoint's own tokenizer files.

    ``transformers.AutoTokenizer`` reads every HF directory we export or import (SentencePiece ``tokenizer.model``
    or BPE ``tokenizer.json``) and its ``chat_template``; when the directory has no template, our tokenizer's
    ``apply_chat_template`` (``model/tokenizer.py``) renders the messages. Completions get BOS like vLLM's server;
    chat prompts are rendered to text then encoded without extra special tokens (the template places them).
    """

    def __init__(self, model_dir: str):
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.model_dir = model_dir
        self._ours = None

    def encode(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=True)["input_ids"])

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        if getattr(self.tok, "chat_template", None):
            text = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:
            if self._ours is None:
                from model.tokenizer import load_tokenizer

                self._ours = load_tokenizer(self.model_dir)
            text = self._ours.apply_chat_template(messages, add_generation_prompt=True)
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def prompts(self, req: CompletionRequest | ChatRequest) -> list[list[int]]:
        """The request's prompts as token ids (400 for a token id outside the vocabulary)."""
        if isinstance(req, ChatRequest):
            return [self.encode_chat(req.messages)]
        out = []
        for p in req.prompts:
            if isinstance(p, list) and any(not 0 <= t < len(self.tok) for t in p):
                raise APIError(400, "'prompt' holds a token id outside the vocabulary", param="prompt",
                               code="invalid_value")
            out.append(p if isinstance(p, list) else self.encode(p))
        return out


def to_choices(codec: PromptCodec, info: ModelInfo, req: CompletionRequest | ChatRequest) -> list[Choice]:
    """One ``Choice`` per (prompt, sample); context checks raise 400."""
    s = req.sampling
    param = "max_completion_tokens" if isinstance(req, ChatRequest) else "max_tokens"
    choices = []
    for i, ids in enumerate(codec.prompts(req)):
        max_tokens = check_context(len(ids), s.max_tokens, info.max_model_len, param=param)
        for j in range(s.n):  # a given seed still gives n different choices (seed, seed + 1, …)
            gp = GenParams(max_tokens=max_tokens, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                           stop=s.stop, seed=None if s.seed is None else s.seed + j, ignore_eos=s.ignore_eos)
            choices.append(Choice(i * s.n + j, ids, gp))
    return choices
