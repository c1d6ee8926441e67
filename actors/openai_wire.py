"""OpenAI response shaping (requests are parsed in ``actors/openai_schema.py``): completion bodies, server-sent
event chunks, usage, the model list. Plain dicts and strings, independent of FastAPI and Ray."""

from __future__ import annotations

import json
import time
from typing import Any

from actors.engines import Delta, ModelInfo
from actors.openai_schema import APIError
from actors.stream_batcher import Choice

DONE = "data: [DONE]\n\n"


def engine_failed(rid: str, e: BaseException) -> APIError:
    """The 500 answered when the engine fails mid-request (the request id lets the operator find the log line)."""
    return APIError(500, f"generation failed ({type(e).__name__}); request id {rid}", type="server_error",
                    code="engine_error")


def usage(choices: list[Choice], completion_tokens: int) -> dict[str, int]:
    seen, prompt_tokens = set(), 0
    for c in choices:  # each prompt counted once, however many choices it has
        if id(c.prompt_ids) not in seen:
            seen.add(id(c.prompt_ids))
            prompt_tokens += len(c.prompt_ids)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def models_body(info: ModelInfo) -> dict[str, Any]:
    return {"object": "list", "data": [
        {"id": info.name, "object": "model", "created": 0, "owned_by": "llamaray", "root": info.model_dir,
         "hash": info.hash, "max_model_len": info.max_model_len, "engine": info.engine}]}


class CompletionBody:
    """Collects a non-streamed request's deltas into the ``text_completion`` / ``chat.completion`` object."""

    def __init__(self, rid: str, chat: bool, info: ModelInfo, choices: list[Choice]):
        self.rid, self.chat, self.info, self.choices = rid, chat, info, choices
        self.texts: dict[int, list[str]] = {c.index: [] for c in choices}
        self.reasons: dict[int, str | None] = {}

    def add(self, batch: list[tuple[int, Delta]]) -> None:
        for index, d in batch:
            self.texts[index].append(d.text)
            if d.finish_reason is not None:
                self.reasons[index] = d.finish_reason

    def body(self, completion_tokens: int) -> dict[str, Any]:
        choices = []
        for i in sorted(self.texts):
            text = "".join(self.texts[i])
            content = {"message": {"role": "assistant", "content": text}} if self.chat else {"text": text}
            choices.append({"index": i, **content, "logprobs": None, "finish_reason": self.reasons.get(i, "abort")})
        return {"id": self.rid, "object": "chat.completion" if self.chat else "text_completion",
                "created": int(time.time()), "model": self.info.name, "system_fingerprint": self.info.hash,
                "choices": choices, "usage": usage(self.choices, completion_tokens)}


class EventChunks:
    """Server-sent events of a streamed request: ``data: {chunk}`` lines, then ``DONE``."""

    def __init__(self, rid: str, chat: bool, info: ModelInfo):
        self.chat = chat
        self.base = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                     "created": int(time.time()), "model": info.name, "system_fingerprint": info.hash}

    def chunk(self, choices: list[dict], **extra) -> str:
        return f"data: {json.dumps({**self.base, 'choices': choices, **extra})}\n\n"

    def roles(self, choices: list[Choice]) -> str:
        """Chat: the role comes first, as OpenAI sends it."""
        return self.chunk([{"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                            "finish_reason": None} for c in choices])

    def deltas(self, batch: list[tuple[int, Delta]]) -> str:
        """One event per delta that carries text or a finish reason (empty string when none does)."""
        events = []
        for index, d in batch:
            if not d.text and d.finish_reason is None:
                continue
            if self.chat:
                piece = {"delta": {"content": d.text} if d.text else {}}
            else:
                piece = {"text": d.text}
            events.append(self.chunk([{"index": index, **piece, "logprobs": None,
                                       "finish_reason": d.finish_reason}]))
        return "".join(events)

    def usage(self, choices: list[Choice], completion_tokens: int) -> str:
        return self.chunk([], usage=usage(choices, completion_tokens))

    @staticmethod
    def error(e: APIError) -> str:
        return f"data: {json.dumps(e.body())}\n\n"
