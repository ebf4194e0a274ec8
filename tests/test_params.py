"""One source for every pseudo-bulk parameter: the Python signature, the
command line and the TOML keys of a batch run agree with PseudobulkParams."""

from __future__ import annotations

import inspect
from dataclasses import fields

from genepert_scale.cli.commands import build_parser
from genepert_scale.cli.config import INPUT_PARAMETERS, InputConfig, PseudobulkConfig
from genepert_scale.pp.aggregate import pseudobulk
from genepert_scale.pp.params import PARAMETERS, PseudobulkParams


def test_the_python_signature_has_every_parameter_with_its_default():
    signature = inspect.signature(pseudobulk).parameters
    for spec in fields(PseudobulkParams):
        assert signature[spec.name].default == spec.default, spec.name


def test_the_command_line_has_every_parameter_with_its_default_and_choices():
    args = build_parser().parse_args(["pseudobulk", "screen.zarr", "--out", "pb.zarr"])
    actions = {a.dest: a for a in build_parser()._subparsers._group_actions[0]
               .choices["pseudobulk"]._actions}
    for spec in fields(PseudobulkParams):
        assert getattr(args, spec.name) == spec.default, spec.name
        assert tuple(actions[spec.name].choices or ()) == spec.metadata["choices"], spec.name
        assert actions[spec.name].help == spec.metadata["help"], spec.name


def test_the_toml_keys_have_every_parameter_with_its_default():
    toml = {spec.name: spec for spec in fields(PseudobulkConfig)}
    toml.update({spec.name: spec for spec in fields(InputConfig) if spec.name in INPUT_PARAMETERS})
    for spec in fields(PseudobulkParams):
        assert toml[spec.name].default == spec.default, spec.name
        assert toml[spec.name].metadata["choices"] == spec.metadata["choices"], spec.name
    assert set(PARAMETERS) <= set(toml)


def test_boolean_parameters_can_be_turned_off_on_the_command_line():
    args = build_parser().parse_args(["pseudobulk", "s.zarr", "--out", "o", "--no-group-variance"])
    assert args.group_variance is False
