"""One engine package for Serve, rollouts and jobs: the protocol and shared types (``base.py``), the registry
(``registry.py``) and one file per engine (``vllm.py``, ``reference.py``), which register themselves on import.

Adding an engine: a new file here with a class that subclasses ``EngineBase`` (declaring the options it
``honours``), decorated ``@register("name")``, and its import below.
"""

from actors.engines import reference, vllm  # noqa: F401 — registers the built-in engines
from actors.engines.base import (Candidate, Delta, Engine, EngineBase, EngineError, EngineHealth, EngineLoad,
                                 EngineOptions, GenParams, LoadTally, ModelInfo, checkpoint_context_len, model_hash)
from actors.engines.reference import ReferenceEngine, reference_device
from actors.engines.registry import engine_cls, engine_names, register
from actors.engines.vllm import VLLMEngine

__all__ = ["Candidate", "Delta", "Engine", "EngineBase", "EngineError", "EngineHealth", "EngineLoad", "EngineOptions",
           "GenParams", "LoadTally", "ModelInfo", "ReferenceEngine", "VLLMEngine", "checkpoint_context_len",
           "engine_cls", "engine_names", "model_hash", "reference_device", "register"]
