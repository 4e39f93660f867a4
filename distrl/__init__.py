"""distrl: distributed reinforcement-learning fine-tuning of causal language models on Ray.

``distrl.generate_text`` and ``distrl.ChatInterface`` are loaded on first use, so
``import distrl`` stays light (no torch or transformers).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from distrl.chat import ChatInterface, generate_text

__all__ = ["ChatInterface", "generate_text"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from importlib import import_module

        return getattr(import_module("distrl.chat"), name)
    raise AttributeError(f"module 'distrl' has no attribute {name!r}")
