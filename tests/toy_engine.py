"""A toy engine for tests/test_engine_registry.py: it answers every prompt with the same few tokens.

Importing this module registers it as ``"toy"`` — the whole of what adding an engine takes. It lives in its own
module (not in the test file) so Ray workers and Serve replicas can import it when they receive the class.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from actors.engines import Candidate, Delta, EngineBase, EngineHealth, GenParams, register

WORDS = ("hello", " from", " the", " toy")
"""The answer, one token per word (token ids 1, 2, 3, 4)."""


@register("toy")
class ToyEngine(EngineBase):
    honours = frozenset()  # only the options every engine honours

    def __init__(self, model_dir: str, options=None):
        super().__init__(model_dir, options)
        self.started = False

    async def start(self, streaming: bool = False) -> None:
        self.started = True

    @staticmethod
    def _answer(params: GenParams) -> tuple[list[int], str, str]:
        k = min(params.max_tokens, len(WORDS))
        return list(range(1, k + 1)), "".join(WORDS[:k]), "stop" if k == len(WORDS) else "length"

    def generate(self, prompts: list[list[int]], params: GenParams) -> list[list[Candidate]]:
        ids, text, reason = self._answer(params)
        return [[Candidate(text, ids, reason) for _ in range(params.n)] for _ in prompts]

    async def stream(self, prompt_ids: list[int], params: GenParams, request_id: str) -> AsyncIterator[Delta]:
        ids, _, reason = self._answer(params)
        for i, tok in enumerate(ids):
            yield Delta(WORDS[tok - 1], (tok,), reason if i == len(ids) - 1 else None)

    async def abort(self, request_id: str) -> None:
        pass

    def load_weights(self, model_dir: str) -> None:
        self.loaded(model_dir)

    async def health(self) -> EngineHealth:
        return self.health_report(self.started, "toy")

    async def shutdown(self) -> None:
        self.started = False
