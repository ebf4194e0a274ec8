"""Entropic optimal transport from control cells to perturbed cells in a
latent space, and the shift it gives every control cell.

Notes
-----
With control latents ``z_i`` (``i = 1..n``), a perturbation's latents ``y_j``
(``j = 1..m``), uniform weights and the squared Euclidean cost ``C_ij =
‖z_i − y_j‖²`` divided by its mean (so that ``epsilon`` does not depend on
the latent's scale), Sinkhorn's algorithm (POT's ``ot.sinkhorn``: its
log-stabilised form, or with epsilon scaling at small ``ε``) finds the plan
``T`` minimising ``⟨T, C⟩ − ε H(T)`` with row sums ``1/n`` and column sums
``1/m``. Its barycentric map sends ``z_i`` to
``ŷ_i = Σ_j T_ij y_j / Σ_j T_ij`` and gives the shift ``Δz_i = ŷ_i − z_i``.
As ``ε → 0`` with ``n = m`` the plan tends to a permutation (the optimal
assignment) and ``ŷ_i`` to the cell ``z_i`` is assigned to.

At larger ``ε`` the barycentric map averages many targets and contracts the
cloud toward its mean: on a 32-dimensional VAE latent with 500 cells a side,
the mapped cells kept a third of the target latents' variance at ``ε = 0.05``
and 70% at ``ε = 0.01``. The *debiased* map subtracts the same map to a
second, independent sample of the source distribution (``r̂_i``, another
set of control cells): ``Δz_i = ŷ_i − r̂_i``, so that a perturbation
without effect gives ``Δz ≈ 0`` and the contraction cancels (the centred
estimator of Pooladian, Cuturi & Niles-Weed, "Debiaser beware: pitfalls of
centering regularized transport maps", ICML 2022, who show that it helps at
large ``ε`` and can hurt at small ``ε``). On the same latent, at ``ε = 0.1``
the debiased map kept 99% of the variance and matched the target cells (energy
distance ≈ 0); at ``ε = 0.01`` it overshot (180%).
"""

from __future__ import annotations

import logging
import warnings

import numpy as np

from ...errors import ParameterError

log = logging.getLogger(__name__)

#: Default entropic regularisation, relative to the mean cost (for the
#: debiased map; see the Notes).
DEFAULT_EPSILON = 0.1
#: Sinkhorn iterations at most.
MAX_ITER = 5000
#: Epsilons below this use epsilon scaling (the stabilised Sinkhorn's kernel
#: underflows at 0.001, and at 0.01 it took 10 s on 500 × 500 cells against
#: 6 s scaled; at 0.1 it took 0.07 s against 2.6 s).
SCALING_BELOW = 0.05


def sinkhorn_plan(
    source: np.ndarray,
    target: np.ndarray,
    epsilon: float = DEFAULT_EPSILON,
    *,
    max_iter: int = MAX_ITER,
) -> np.ndarray:
    """The entropic OT plan between two point clouds with uniform weights.

    Parameters
    ----------
    source, target
        Points in rows (``n × d`` and ``m × d``).
    epsilon
        Regularisation relative to the mean squared distance.
    max_iter
        Sinkhorn iterations at most (a warning is logged if it stops unconverged).

    Returns
    -------
    numpy.ndarray
        The plan, ``n × m``, rows summing to ``1/n`` and columns to ``1/m``.
    """
    import ot

    source = np.asarray(source, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    cost = ot.dist(source, target, metric="sqeuclidean")
    cost /= cost.mean() if cost.mean() > 0 else 1.0
    a = np.full(len(source), 1.0 / len(source))
    b = np.full(len(target), 1.0 / len(target))
    scaled = "sinkhorn_epsilon_scaling"
    method = scaled if epsilon < SCALING_BELOW else "sinkhorn_stabilized"
    plan = _sinkhorn(a, b, cost, epsilon, method, max_iter)
    if not np.all(np.isfinite(plan)) and method != scaled:
        plan = _sinkhorn(a, b, cost, epsilon, scaled, max_iter)
    if not np.all(np.isfinite(plan)):
        raise ParameterError(f"optimal transport of {len(source)} x {len(target)} cells failed at "
                         f"epsilon {epsilon}; use a larger --ot-epsilon")
    return plan


def _sinkhorn(a: np.ndarray, b: np.ndarray, cost: np.ndarray, epsilon: float, method: str,
              max_iter: int) -> np.ndarray:
    """POT's Sinkhorn of ``method``; its warnings are logged (once each)."""
    import ot

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = ot.sinkhorn(a, b, cost, epsilon, method=method, numItermax=max_iter, stopThr=1e-7)
    for message in dict.fromkeys(str(w.message) for w in caught):
        log.warning("optimal transport (%d x %d cells, epsilon %g, %s): %s",
                    len(a), len(b), epsilon, method, message)
    return plan


def barycentric_map(plan: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Where the plan sends every source point: ``T y / T 1`` (rows of ``plan``)."""
    mass = plan.sum(axis=1, keepdims=True)
    return (plan @ target) / np.where(mass > 0, mass, 1.0)


def ot_shift(
    source: np.ndarray,
    target: np.ndarray,
    epsilon: float = DEFAULT_EPSILON,
    *,
    reference: np.ndarray | None = None,
) -> np.ndarray:
    """The shift ``Δz`` of every source point (see the module's Notes).

    Without ``reference``: ``ŷ_i − z_i``, the barycentric map of the
    entropic plan to ``target``. With ``reference`` (another sample of the
    source's distribution): ``ŷ_i − r̂_i``, where ``r̂_i`` is the barycentric
    map of the plan to ``reference`` — the debiased map.
    """
    source = np.asarray(source, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    moved = barycentric_map(sinkhorn_plan(source, target, epsilon), target)
    if reference is None:
        return (moved - source).astype(np.float32)
    reference = np.asarray(reference, dtype=np.float64)
    start = barycentric_map(sinkhorn_plan(source, reference, epsilon), reference)
    return (moved - start).astype(np.float32)
