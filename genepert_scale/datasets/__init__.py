"""Synthetic screens."""

from __future__ import annotations

from .._lazy import attach

__getattr__, __dir__, __all__ = attach(__name__, {
    "synth_screen": (".synth", "synth_screen"),
})
