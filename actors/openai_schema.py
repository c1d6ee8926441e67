"""OpenAI request validation and the error schema, independent of FastAPI and Ray.

Every bad request becomes an ``APIError`` carrying an HTTP status (400, 401, 404, 413) and the OpenAI error body
``{"error": {"message", "type", "param", "code"}}`` — never a 500. The checks follow what vLLM's OpenAI server
rejects: temperature < 0 or NaN, top_p outside (0, 1], max_tokens ≤ 0 or beyond the remaining context, a prompt
longer than the context, n outside [1, max_n], malformed JSON, a body that is not an object, wrong types.
Unknown fields are ignored (as OpenAI and vLLM do); features this server does not implement (logprobs, echo,
penalties, tools) are refused with 400 rather than silently ignored.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any


class APIError(Exception):
    """An error answered to the client in the OpenAI error schema."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def parse_body(raw: bytes, max_bytes: int) -> dict[str, Any]:
    """Raw request bytes → a JSON object (413 when too large, 400 when not JSON or not an object)."""
    if len(raw) > max_bytes:
        raise APIError(413, f"request body is {len(raw)} bytes; the limit is {max_bytes}", code="request_too_large")
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad(f"request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad(f"request body must be a JSON object, got {type(body).__name__}", code="invalid_body")
    return body


# ---------------------------------------------------------------------------------------------- field readers


def _number(body: dict, key: str, default: float, lo: float | None = None, hi: float | None = None,
            lo_open: bool = False) -> float:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise bad(f"'{key}' must be a number, got {type(v).__name__}", key, "invalid_type")
    v = float(v)
    if math.isnan(v) or math.isinf(v):
        raise bad(f"'{key}' must be a finite number, got {v}", key, "invalid_value")
    if lo is not None and (v <= lo if lo_open else v < lo):
        raise bad(f"'{key}' must be {'>' if lo_open else '>='} {lo}, got {v}", key, "invalid_value")
    if hi is not None and v > hi:
        raise bad(f"'{key}' must be <= {hi}, got {v}", key, "invalid_value")
    return v


def _int(body: dict, key: str, default: int | None) -> int | None:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise bad(f"'{key}' must be an integer, got {type(v).__name__}", key, "invalid_type")
    return v


def _bool(body: dict, key: str, default: bool) -> bool:
    v = body.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad(f"'{key}' must be true or false, got {type(v).__name__}", key, "invalid_type")
    return v


def _stop(body: dict, max_stop: int) -> tuple[str, ...]:
    v = body.get("stop")
    if v is None:
        return ()
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise bad("'stop' must be a string or a list of strings", "stop", "invalid_type")
    if len(v) > max_stop:
        raise bad(f"'stop' holds at most {max_stop} strings, got {len(v)}", "stop", "invalid_value")
    return tuple(s for s in v if s)


def _unsupported(body: dict, keys: dict[str, Any]) -> None:
    """Refuse features this server does not implement (a value other than the neutral one)."""
    for key, neutral in keys.items():
        v = body.get(key)
        if v is not None and v != neutral and not (isinstance(neutral, (int, float)) and v == neutral):
            raise bad(f"'{key}' is not supported by this server", key, "unsupported_parameter")


@dataclass(frozen=True)
class Sampling:
    """The sampling fields shared by both endpoints (validated)."""

    max_tokens: int | None
    temperature: float
    top_p: float
    top_k: int | None
    """None when off (the wire's -1, the engines' convention)."""
    n: int
    stop: tuple[str, ...]
    seed: int | None
    ignore_eos: bool
    """vLLM's extension: keep generating past the end-of-turn token (benchmarks; default false)."""
    stream: bool
    include_usage: bool


def _sampling(body: dict, *, max_n: int, max_stop: int, max_tokens_keys: tuple[str, ...], default_max: int | None
              ) -> Sampling:
    max_tokens = default_max
    for key in max_tokens_keys:
        v = _int(body, key, None)
        if v is not None:
            if v <= 0:
                raise bad(f"'{key}' must be at least 1, got {v}", key, "invalid_value")
            max_tokens = v
            break
    n = _int(body, "n", 1)
    if not 1 <= n <= max_n:
        raise bad(f"'n' must be between 1 and {max_n}, got {n}", "n", "invalid_value")
    top_k = _int(body, "top_k", -1)
    if top_k == 0 or top_k < -1:
        raise bad(f"'top_k' must be -1 (off) or positive, got {top_k}", "top_k", "invalid_value")
    stream = _bool(body, "stream", False)
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise bad("'stream_options' must be an object", "stream_options", "invalid_type")
    include_usage = _bool(opts or {}, "include_usage", False)
    if opts is not None and not stream:
        raise bad("'stream_options' is only allowed when 'stream' is true", "stream_options", "invalid_value")
    return Sampling(max_tokens=max_tokens,
                    temperature=_number(body, "temperature", 1.0, lo=0.0, hi=2.0),
                    top_p=_number(body, "top_p", 1.0, lo=0.0, hi=1.0, lo_open=True),
                    top_k=None if top_k == -1 else top_k, n=n, stop=_stop(body, max_stop), seed=_int(body, "seed", None),
                    ignore_eos=_bool(body, "ignore_eos", False), stream=stream, include_usage=include_usage)


def _model(body: dict) -> str | None:
    v = body.get("model")
    if v is not None and not isinstance(v, str):
        raise bad(f"'model' must be a string, got {type(v).__name__}", "model", "invalid_type")
    return v


_COMMON_UNSUPPORTED = {"presence_penalty": 0, "frequency_penalty": 0, "logit_bias": None, "best_of": 1,
                       "tools": None, "functions": None, "response_format": None}


@dataclass(frozen=True)
class CompletionRequest:
    model: str | None
    prompts: list[str | list[int]]
    """Each prompt is text or a list of token ids; every one gets ``n`` choices."""
    sampling: Sampling


@dataclass(frozen=True)
class ChatRequest:
    model: str | None
    messages: list[dict[str, str]]
    sampling: Sampling


def parse_completion(body: dict, *, max_n: int, max_stop: int = 4, max_prompts: int = 16) -> CompletionRequest:
    _unsupported(body, {**_COMMON_UNSUPPORTED, "logprobs": None, "echo": False, "suffix": None})
    p = body.get("prompt")
    if p is None:
        raise bad("'prompt' is required", "prompt", "missing_required_parameter")
    if isinstance(p, str):
        prompts: list[str | list[int]] = [p]
    elif isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        prompts = [list(p)]
    elif isinstance(p, list) and p and all(isinstance(s, str) for s in p):
        prompts = list(p)
    elif isinstance(p, list) and p and all(isinstance(x, list) and x and all(
            isinstance(t, int) and not isinstance(t, bool) for t in x) for x in p):
        prompts = [list(x) for x in p]
    else:
        raise bad("'prompt' must be a string, a list of strings, a list of token ids or a list of such lists "
                  "(non-empty)", "prompt", "invalid_type")
    if len(prompts) > max_prompts:
        raise bad(f"at most {max_prompts} prompts per request, got {len(prompts)}", "prompt", "invalid_value")
    s = _sampling(body, max_n=max_n, max_stop=max_stop, max_tokens_keys=("max_tokens",), default_max=16)
    return CompletionRequest(_model(body), prompts, s)


def parse_chat(body: dict, *, max_n: int, max_stop: int = 4) -> ChatRequest:
    _unsupported(body, {**_COMMON_UNSUPPORTED, "logprobs": False, "top_logprobs": None, "tool_choice": None})
    msgs = body.get("messages")
    if msgs is None:
        raise bad("'messages' is required", "messages", "missing_required_parameter")
    if not isinstance(msgs, list) or not msgs:
        raise bad("'messages' must be a non-empty list", "messages", "invalid_type")
    out = []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(f"'{where}' must be an object", where, "invalid_type")
        role, content = m.get("role"), m.get("content")
        if role not in ("system", "user", "assistant", "developer"):
            raise bad(f"'{where}.role' must be one of system, developer, user, assistant; got {role!r}",
                      f"{where}.role", "invalid_value")
        if isinstance(content, list):  # [{"type": "text", "text": …}, …]
            if not all(isinstance(c, dict) and c.get("type") == "text" and isinstance(c.get("text"), str)
                       for c in content):
                raise bad(f"'{where}.content' parts must be {{'type': 'text', 'text': str}} (text only)",
                          f"{where}.content", "invalid_type")
            content = "".join(c["text"] for c in content)
        if not isinstance(content, str):
            raise bad(f"'{where}.content' must be a string, got {type(content).__name__}", f"{where}.content",
                      "invalid_type")
        out.append({"role": "system" if role == "developer" else role, "content": content})
    s = _sampling(body, max_n=max_n, max_stop=max_stop, max_tokens_keys=("max_completion_tokens", "max_tokens"),
                  default_max=None)
    return ChatRequest(_model(body), out, s)


def check_context(prompt_len: int, max_tokens: int | None, max_model_len: int, *, param: str = "max_tokens") -> int:
    """The max_tokens to use: the remaining context when unset; 400 when the prompt or prompt+max_tokens is too long."""
    if prompt_len >= max_model_len:
        raise bad(f"the prompt is {prompt_len} tokens; this model's context is {max_model_len} tokens, which leaves "
                  "no room for a completion", "prompt" if param == "max_tokens" else "messages", "context_length_exceeded")
    remaining = max_model_len - prompt_len
    if max_tokens is None:
        return remaining
    if max_tokens > remaining:
        raise bad(f"'{param}' is {max_tokens} but only {remaining} tokens remain after the {prompt_len}-token prompt "
                  f"in a context of {max_model_len}", param, "context_length_exceeded")
    return max_tokens
