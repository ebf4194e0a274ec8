"""Splits: K-fold, GEARS' simulation split and its subgroups on a hand-made
pair screen, custom split files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from genepert_scale.errors import ParameterError
from genepert_scale.tl.evaluate import make_split
from genepert_scale.tl.splits import (
    UNUSED,
    custom_split,
    kfold_split,
    read_split_file,
    simulation_split,
    subgroups,
)

#: Singles of A..F; pairs of every kind.
SCREEN = ["A", "B", "C", "D", "E", "F", "A+B", "A+C", "B+C", "C+D", "D+E", "E+F", "A+F", "G+H"]


def test_subgroups_by_hand():
    names = np.array(SCREEN, dtype=object)
    train = np.isin(names, ["A", "B", "C", "A+B"])
    test = np.isin(names, ["D", "E", "A+C", "B+C", "C+D", "D+E", "G+H", "A+F"])
    got = dict(zip(names, subgroups(names, test, train)))
    assert got["D"] == got["E"] == "unseen_single"
    assert got["A+C"] == got["B+C"] == "combo_seen2"       # both genes trained alone
    assert got["C+D"] == got["A+F"] == "combo_seen1"       # F is not perturbed alone in training
    assert got["D+E"] == got["G+H"] == "combo_seen0"
    assert got["A"] == got["F"] == got["A+B"] == ""          # not tested


def test_simulation_split_follows_gears():
    names = np.array(SCREEN, dtype=object)
    split = simulation_split(list(names), test_share=0.25, inner_folds=2, seed=3)
    assert split.kind == "simulation" and split.test_groups == (0,)
    test, train = split.test_mask(0), split.train_mask(0)
    assert not (test & train).any() and (test | train).all()
    genes = {g for p in names for g in p.split("+")}  # 8 genes: int(8 * 0.75) = 6 train genes
    train_genes = {g for p in names[train] for g in p.split("+")}
    assert split.parameters["n_train_genes"] == 6 and train_genes <= genes
    held_out = genes - train_genes
    for p, is_test in zip(names, test):
        p_genes = set(p.split("+"))
        if p_genes & held_out:                 # needs a held-out gene: always test
            assert is_test, p
        elif len(p_genes) == 1:                # single of a training gene: always trains
            assert not is_test, p
    # a quarter of the fully seen pairs is tested (GEARS' combo_seen2)
    full = [p for p in names if "+" in p and not set(p.split("+")) & held_out]
    assert sum(test[list(names).index(p)] for p in full) == len(full) - int(len(full) * 0.75)
    labels = subgroups(names, test, train)
    singles_trained = {p for p in names[train] if "+" not in p}
    for p, label in zip(names[test], labels[test]):
        k = len(set(p.split("+")) & singles_trained)
        assert label == ("unseen_single" if "+" not in p else f"combo_seen{k}")
    # inner CV groups only among training perturbations; the same seed gives the same split
    assert set(split.group[train]) == {1, 2}
    np.testing.assert_array_equal(split.group, simulation_split(list(names), inner_folds=2, seed=3).group)


def test_kfold_split_tests_every_perturbation_once():
    split = kfold_split(10, 3, seed=1)
    assert split.test_groups == (0, 1, 2) and (split.fold == split.group).all()
    assert split.parameters == {"split": "kfold", "n_folds": 3, "seed": 1}


def test_custom_split_files(tmp_path):
    csv = tmp_path / "split.csv"
    csv.write_text("perturbation,split\nA+ctrl,train\nB,val\nC,train\nctrl+D,test\nA+B,test\nZZZ,train\n")
    assignment = read_split_file(str(csv))
    assert assignment == {"A": "train", "B": "val", "C": "train", "D": "test", "A+B": "test", "ZZZ": "train"}
    names = ["A", "B", "C", "D", "A+B", "E"]
    split = custom_split(names, assignment, inner_folds=2, source=str(csv))
    assert split.group[-1] == UNUSED and split.parameters["n_unlisted"] == 1   # E is left out
    assert split.test_mask(0).tolist() == [False, False, False, True, True, False]
    assert split.train_mask(0).tolist() == [True, True, True, False, False, False]
    gears = tmp_path / "split.json"
    gears.write_text(json.dumps({"train": ["A+ctrl", "B+ctrl", "C+ctrl"], "test": ["D+ctrl", "A+B"],
                                 "val": ["E+ctrl"]}))
    split = make_split("custom", names, n_folds=2, split_file=str(gears))
    assert split.test_mask(0).tolist() == [False, False, False, True, True, False]
    assert (split.group != UNUSED).all()
    folds = tmp_path / "folds.tsv"
    folds.write_text("perturbation\tfold\nA\t3\nB\t3\nC\t7\nD\t7\nA+B\t3\nE\t7\n")
    split = make_split("custom", names, split_file=str(folds))
    assert split.test_groups == (0, 1) and split.group.tolist() == [0, 0, 1, 1, 0, 1]


def test_split_errors(tmp_path):
    names = ["A", "B", "C"]
    with pytest.raises(ParameterError, match="--split-file goes with --split custom"):
        make_split("kfold", names, split_file="x.csv")
    with pytest.raises(ParameterError, match="needs it"):
        make_split("custom", names)
    with pytest.raises(ParameterError, match="--test-share applies"):
        make_split("kfold", names, n_folds=2, test_share=0.3)
    with pytest.raises(ParameterError, match="between 0 and 1"):
        simulation_split(names, test_share=1.5)
    bad = tmp_path / "bad.csv"
    bad.write_text("perturbation,split\nA,train\nB,holdout\n")
    with pytest.raises(ParameterError, match="train/val/test or fold numbers"):
        make_split("custom", names, split_file=str(bad))
    with pytest.raises(ParameterError, match="does not exist"):
        read_split_file(str(tmp_path / "missing.csv"))
