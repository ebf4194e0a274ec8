"""Splits of perturbations into training and test sets, and test subgroups.

A :class:`Split` assigns every perturbation a *group* of the ridge
statistics: the test groups are held out in turn (``test_groups``), the
others only ever train (and serve the inner cross-validation that chooses
alpha). Three kinds:

* ``kfold`` (:func:`kfold_split`): K folds over perturbations, each tested
  once; a pair's genes may be seen as singles in training, as in GenePert;
* ``simulation`` (:func:`simulation_split`): GEARS' split for screens with
  pairs — held-out genes, one test set;
* ``custom`` (:func:`custom_split`): from a file, either a train/test label or
  a fold number per perturbation.

Test perturbations are reported by :func:`subgroups` (GEARS' names).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd

from ..errors import ParameterError
from ..validate import check_folds
from ..pp.labels import GEARS_CONTROL, canonical, parse_label
from ..io.store import delimiter, filesystem

log = logging.getLogger(__name__)

SplitKind = Literal["kfold", "simulation", "custom", "context"]
#: The splits; ``context`` (each context of a store with contexts held out in
#: turn) is made by :mod:`.contexts`, not here.
SPLIT_KINDS: tuple[str, ...] = ("kfold", "simulation", "custom", "context")
#: GEARS' default: 75% of genes train, 75% of fully seen pairs train.
DEFAULT_TEST_SHARE = 0.25
#: Group of perturbations a custom split leaves out.
UNUSED = -1


@dataclass(frozen=True)
class Split:
    """Perturbations assigned to groups of the ridge statistics.

    Attributes
    ----------
    kind
        ``kfold``, ``simulation`` or ``custom``.
    group
        Group of every perturbation, ``0 .. n_groups-1``, or :data:`UNUSED`.
    test_groups
        Groups held out in turn as test folds; the others only train.
    parameters
        What reproduces the split (written with the results).
    """

    kind: str
    group: np.ndarray
    test_groups: tuple[int, ...]
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def n_groups(self) -> int:
        return int(self.group.max()) + 1

    @property
    def fold(self) -> np.ndarray:
        """Test fold of every perturbation; :data:`UNUSED` where it only trains
        (or is left out)."""
        return np.where(np.isin(self.group, self.test_groups), self.group, UNUSED)

    def test_mask(self, fold: int) -> np.ndarray:
        return self.group == fold

    def train_mask(self, fold: int) -> np.ndarray:
        return (self.group != fold) & (self.group != UNUSED)


def kfold(n: int, n_folds: int, seed: int) -> np.ndarray:
    """Fold of each of ``n`` perturbations: a seeded permutation cut into
    ``n_folds`` near-equal parts (singles and pairs alike, so a pair's genes
    may be seen as singles in training, as in GenePert)."""
    check_folds(n_folds, n, "the pseudo-bulk")
    fold = np.empty(n, dtype=np.int64)
    for k, part in enumerate(np.array_split(np.random.default_rng(seed).permutation(n), n_folds)):
        fold[part] = k
    return fold


def kfold_split(n: int, n_folds: int, seed: int) -> Split:
    """K-fold over perturbations, every fold tested once."""
    return Split("kfold", kfold(n, n_folds, seed), tuple(range(n_folds)),
                 {"split": "kfold", "n_folds": n_folds, "seed": seed})


def train_test_split(
    kind: str, test: np.ndarray, inner_folds: int, seed: int, parameters: dict[str, Any],
    unused: np.ndarray | None = None,
) -> Split:
    """One test set (group 0); the training perturbations are cut into
    ``inner_folds`` groups for the inner CV choosing alpha."""
    unused = np.zeros_like(test) if unused is None else unused
    train = ~test & ~unused
    if not test.any() or not train.any():
        raise ParameterError(
            f"the {kind} split has {int(test.sum())} test and {int(train.sum())} training "
            "perturbations; both must be non-empty"
        )
    group = np.full(test.size, UNUSED, dtype=np.int64)
    group[test] = 0
    group[train] = 1 + kfold(int(train.sum()), min(inner_folds, int(train.sum())), seed)
    return Split(kind, group, (0,), parameters)


def simulation_split(
    perturbations: Sequence[str],
    *,
    test_share: float = DEFAULT_TEST_SHARE,
    inner_folds: int = 5,
    seed: int = 0,
) -> Split:
    """GEARS' ``simulation`` split: hold out genes, test what needs them.

    Parameters
    ----------
    perturbations
        Canonical labels, ``A`` or ``A+B``.
    test_share
        Share of the perturbed genes held out, and share of the pairs whose
        genes are all kept that go to the test set (GEARS' defaults
        ``train_gene_set_size = combo_seen2_train_frac = 0.75``).
    inner_folds
        Groups of the training perturbations for choosing alpha.
    seed
        Seed of the gene and pair draws.

    Notes
    -----
    As ``DataSplitter.get_simulation_split`` in GEARS (Roohani et al., Nat.
    Biotechnol. 2024; ``gears/data_utils.py``): of the ``m`` genes, a seeded
    ``int(m (1 − test_share))`` are training genes. Singles of training genes
    train; pairs of two training genes train, except ``n − int(n (1 −
    test_share))`` of them drawn for the test set; every other perturbation
    (singles of held-out genes, pairs with a held-out gene) is a test
    perturbation. The draws use numpy's ``default_rng``, not GEARS' global
    seed, so the same seed gives a different (equally distributed) split.
    """
    if not 0 < test_share < 1:
        raise ParameterError(f"--test-share must be between 0 and 1, got {test_share}")
    genes_of = [parse_label(p, GEARS_CONTROL) for p in perturbations]
    genes = np.array(sorted({g for gs in genes_of for g in gs}), dtype=object)
    rng = np.random.default_rng(seed)
    train_genes = set(rng.choice(genes, int(len(genes) * (1 - test_share)), replace=False))
    seen = np.array([sum(g in train_genes for g in gs) for gs in genes_of])
    size = np.array([len(gs) for gs in genes_of])
    test = seen < size
    full_pairs = np.flatnonzero((size > 1) & (seen == size))
    kept = rng.choice(full_pairs, int(full_pairs.size * (1 - test_share)), replace=False)
    test[np.setdiff1d(full_pairs, kept)] = True
    parameters = {"split": "simulation", "test_share": test_share, "seed": seed,
                  "n_perturbed_genes": len(genes), "n_train_genes": len(train_genes),
                  "inner_folds": inner_folds}
    return train_test_split("simulation", test, inner_folds, seed, parameters)


def read_split_file(path: str, storage_options: dict[str, Any] | None = None) -> dict[str, str]:
    """Canonical perturbation → split label (``train``, ``val``, ``test`` or a
    fold number) from a file.

    ``.json``: GEARS' split dictionary ``{"train": [...], "val": [...],
    "test": [...]}`` (labels ``A+ctrl``, ``A+B``); otherwise a CSV (TSV for
    ``.tsv``/``.txt``) with columns ``perturbation`` and ``split`` (or
    ``fold``). Control labels are ignored.
    """
    fs, root = filesystem(path, storage_options)
    if not fs.exists(root):
        raise ParameterError(f"split file {path} does not exist")
    with fs.open(root, "rb") as fh:
        if str(path).lower().endswith(".json"):
            try:
                doc = json.load(fh)
            except json.JSONDecodeError as err:
                raise ParameterError(f"split file {path} is not valid JSON: {err}") from err
            if not isinstance(doc, Mapping):
                raise ParameterError(f"split file {path}: expected an object {{split: [perturbations]}}")
            pairs = [(label, str(name)) for name, labels in doc.items() for label in labels]
        else:
            sep = delimiter(path)
            frame = pd.read_csv(fh, sep=sep, dtype=str)
            column = "split" if "split" in frame else "fold" if "fold" in frame else None
            if "perturbation" not in frame or column is None:
                raise ParameterError(
                    f"split file {path} needs columns 'perturbation' and 'split' (or 'fold'), "
                    f"found {', '.join(frame.columns)}"
                )
            pairs = list(zip(frame["perturbation"], frame[column].str.strip()))
    out: dict[str, str] = {}
    for label, name in pairs:
        genes = parse_label(str(label), GEARS_CONTROL)
        if genes:
            out[canonical(genes)] = name
    return out


def custom_split(
    perturbations: Sequence[str],
    assignment: Mapping[str, str],
    *,
    inner_folds: int = 5,
    seed: int = 0,
    source: str | None = None,
) -> Split:
    """A split from :func:`read_split_file`.

    Labels ``train``/``val``/``test`` give one test set (``val`` trains: alpha
    is chosen by inner CV); integer labels are folds, each tested once.
    Perturbations the file does not list are left out (and logged).
    """
    labels = pd.Series([assignment.get(p) for p in perturbations], dtype=object)
    unused = labels.isna().to_numpy()
    if unused.all():
        raise ParameterError(f"the split file {source} lists none of the screen's perturbations")
    if unused.any():
        log.warning("split file %s does not list %d perturbations; they are left out: %s",
                    source, unused.sum(), ", ".join(np.asarray(perturbations, dtype=object)[unused][:20]))
    values = set(labels.dropna())
    parameters = {"split": "custom", "split_file": source, "seed": seed,
                  "n_unlisted": int(unused.sum())}
    if values <= {"train", "val", "test"}:
        parameters["inner_folds"] = inner_folds
        return train_test_split("custom", (labels == "test").to_numpy(), inner_folds, seed,
                                parameters, unused)
    try:
        numbers = labels.dropna().astype(int)
    except ValueError as err:
        raise ParameterError(
            f"split file {source}: labels must be train/val/test or fold numbers, got "
            f"{', '.join(sorted(map(str, values))[:10])}"
        ) from err
    codes = {fold: k for k, fold in enumerate(sorted(set(numbers)))}
    if len(codes) < 2:
        raise ParameterError(f"split file {source} has one fold; give at least two or train/test labels")
    group = np.full(len(perturbations), UNUSED, dtype=np.int64)
    group[~unused] = [codes[f] for f in numbers]
    parameters["folds"] = sorted(codes)
    return Split("custom", group, tuple(range(len(codes))), parameters)


def subgroups(perturbations: Sequence[str], test: np.ndarray, train: np.ndarray) -> np.ndarray:
    """GEARS' subgroup of each test perturbation given its training set.

    A single is ``unseen_single``; a perturbation of several genes is
    ``combo_seen{k}``, ``k`` the number of its genes perturbed as singles in
    training. Non-test perturbations get ``""``.

    Notes
    -----
    GEARS counts a gene as seen when it is a training gene of the simulation
    split; where every gene also has a single perturbation (as in Norman et
    al.'s screen) that is the same as being perturbed alone in training. This
    definition holds for any split, K-fold included.
    """
    names = np.asarray(perturbations, dtype=object)
    trained_singles = {p for p in names[train] if "+" not in p}
    out = np.full(len(names), "", dtype=object)
    for i in np.flatnonzero(test):
        genes = set(parse_label(names[i], GEARS_CONTROL))
        out[i] = "unseen_single" if len(genes) == 1 else f"combo_seen{len(genes & trained_singles)}"
    return out
