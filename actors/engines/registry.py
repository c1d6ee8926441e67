"""Engines by name: ``@register("vllm")`` on the class, ``engine_cls("vllm")`` to get it back.

``"auto"`` resolves to vLLM when it can be imported and to the reference engine otherwise (with a warning). The
built-in engines register when ``actors.engines`` is imported; an engine defined elsewhere registers when its
module is imported (import it before asking for its name).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from core.config import ConfigError

log = logging.getLogger(__name__)

_ENGINES: dict[str, type] = {}


def register(name: str) -> Callable[[type], type]:
    """Class decorator: make the engine available as ``name`` (and set its ``name`` attribute)."""
    if not name or name == "auto":
        raise ValueError(f"engine name {name!r} is reserved or empty")

    def deco(cls: type) -> type:
        old = _ENGINES.get(name)
        if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(f"engine {name!r} is already registered by {old.__module__}.{old.__qualname__}")
        cls.name = name
        _ENGINES[name] = cls
        return cls

    return deco


def engine_names() -> list[str]:
    """The registered names (``auto`` is not one: it picks among them)."""
    return sorted(_ENGINES)


def engine_cls(name: str) -> type:
    """The engine class registered as ``name``; ``"auto"``: vLLM when importable, else the reference engine."""
    if name == "auto":
        return _auto()
    if name not in _ENGINES:
        raise ConfigError(f"unknown engine {name!r}; known: auto, {', '.join(engine_names())}")
    return _ENGINES[name]


def _auto() -> type:
    try:
        import vllm  # noqa: F401
        return _ENGINES["vllm"]
    except Exception as e:  # ImportError, or a broken install
        log.warning("vLLM is not importable (%s); falling back to the reference engine", e)
        return _ENGINES["reference"]
