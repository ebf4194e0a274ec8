"""Public names of a room (``gps.pp``, ``gps.tl``, …) imported on first use,
so that ``import genepert_scale`` stays light (PEP 562 module ``__getattr__``)."""

from __future__ import annotations

import importlib
from collections.abc import Callable


def attach(package: str, public: dict[str, tuple[str, str]], eager: tuple[str, ...] = ()
           ) -> tuple[Callable[[str], object], Callable[[], list[str]], list[str]]:
    """The ``__getattr__``, ``__dir__`` and ``__all__`` of ``package``.

    Parameters
    ----------
    package
        The room's module name (its ``__name__``).
    public
        Each public name and the (relative module, attribute) it is.
    eager
        Names the room binds itself (``__all__`` lists them too).
    """

    def __getattr__(name: str) -> object:
        if name not in public:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module, attribute = public[name]
        return getattr(importlib.import_module(module, package), attribute)

    def __dir__() -> list[str]:
        return sorted({*importlib.import_module(package).__dict__, *public})

    return __getattr__, __dir__, sorted({*public, *eager})
