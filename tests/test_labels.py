from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from genepert_scale.errors import LabelError
from genepert_scale.pp.labels import assign_groups, parse_label


@pytest.mark.parametrize(
    ("label", "control", "genes"),
    [
        ("KLF1", "non-targeting", ("KLF1",)),
        ("KLF1+ctrl", "ctrl", ("KLF1",)),
        ("ctrl+KLF1", "ctrl", ("KLF1",)),
        ("KLF1+MAP2K6", "ctrl", ("KLF1", "MAP2K6")),
        ("ctrl", "ctrl", ()),
        ("non-targeting", "non-targeting", ()),
        (" CEBPA ", "control", ("CEBPA",)),
    ],
)
def test_parse_label(label, control, genes):
    assert parse_label(label, control) == genes


@pytest.mark.parametrize("label", ["KLF1+", "+", ""])
def test_unparseable_label_is_named(label):
    with pytest.raises(LabelError, match="cannot parse"):
        parse_label(label, "ctrl")


def test_gears_and_plain_labels_share_groups():
    labels = pd.Categorical(["ctrl", "A+ctrl", "ctrl+A", "A+B", None, "B+ctrl"])
    codes, groups = assign_groups(labels, "ctrl")
    assert groups == ["ctrl", "A", "A+B", "B"]
    np.testing.assert_array_equal(codes, [0, 1, 1, 2, -1, 3])


def test_missing_control_lists_frequent_labels():
    with pytest.raises(LabelError, match=r"'ctrl' matches no cell.*'A' \(2\)"):
        assign_groups(["A", "A", "B"], "ctrl")
