"""Cell-level predictions for unseen perturbations (the optional ``cells``
extra: ``pip install 'genepert-scale[cells]'``, torch and POT).

A VAE gives every cell a latent ``z``; entropic optimal transport aligns
control cells with each training perturbation's cells in that latent, so
every control cell gets a shift ``Δz``; a shift head ``f(z, c_p) → Δz``,
conditioned on a learned projection ``c_p`` of the perturbation's
L2-normalised gene embedding, learns those shifts and moves control cells of
perturbations it has never seen. Modules:

* :mod:`.stream`: cells streamed from the screen's row blocks (no torch);
* :mod:`.transport`: the OT step (POT); :mod:`.distances`: energy distance,
  MMD, PCA (numpy);
* :mod:`.networks`: the VAE, the shift head, their training (torch);
* :mod:`.model`: :func:`cells_fit`, :func:`cells_predict`;
* :mod:`.persist`: :func:`save_cells_model`, :func:`load_cells_model`;
* :mod:`.output`: predicted cells written a perturbation at a time;
* :mod:`.evaluate`: :func:`cells_evaluate` on ``evaluate``'s K folds.
"""

from __future__ import annotations

import importlib.util

from ...errors import ParameterError

#: The modules of the ``cells`` extra: import name → package name.
EXTRA = {"torch": "torch", "ot": "pot"}


def require_extra() -> None:
    """Raise :class:`.ParameterError` naming what is missing of the ``cells`` extra."""
    missing = [package for module, package in EXTRA.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise ParameterError(
            f"the cell model needs {', '.join(missing)}; install the cells extra: "
            "pip install 'genepert-scale[cells]' (torch's CPU build is enough)"
        )


require_extra()

from .evaluate import CellsEvaluation, cells_evaluate  # noqa: E402
from .model import CellsConfig, CellsModel, cells_fit, cells_predict  # noqa: E402
from .output import write_predicted_cells  # noqa: E402
from .persist import load_cells_model, save_cells_model  # noqa: E402

__all__ = ["CellsConfig", "CellsEvaluation", "CellsModel", "cells_evaluate", "cells_fit",
           "cells_predict", "load_cells_model", "require_extra", "save_cells_model",
           "write_predicted_cells"]
