"""The objective options: one declaration, used by the constructor, protect, the state and the docs."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest
import torch

from gradsafe import ObjectiveConfig, ProtectedOptimizer
from gradsafe.options import MODES, OPTION_NAMES, REFERENCES, SCOPES, SIDES, option_table

DOCS = Path(__file__).resolve().parent.parent / "docs"


def _opt(**kw):
    p = torch.nn.Parameter(torch.randn(3))
    return ProtectedOptimizer(torch.optim.SGD([p], lr=0.1), **kw), p


def test_docs_table_is_the_declaration():
    assert option_table() in (DOCS / "api.md").read_text()


def test_literal_types_are_the_allowed_values():
    hints = typing.get_type_hints(ObjectiveConfig)
    assert typing.get_args(hints["mode"]) == MODES == ("project", "conflict", "observe")
    assert typing.get_args(hints["scope"]) == SCOPES == ("global", "tensor", "factored")
    assert typing.get_args(hints["references"]) == REFERENCES
    assert typing.get_args(hints["sides"]) == SIDES
    assert all(f.metadata.get("doc") for f in dataclasses.fields(ObjectiveConfig))


def test_constructor_and_protect_take_every_option():
    values = dict(mode="conflict", rank=3, scope="tensor", strength=1.0, damping=0.5, references="samples",
                  refresh_every=2, energy=0.9, fisher_decay=0.25, sides="left", memory_budget=None,
                  importance=None, scale=2.0, ewc=0.5, fisher="identity", ewc_gamma=0.8, rho=0.1)
    assert set(values) == set(OPTION_NAMES)
    opt, p = _opt(**values)
    assert dataclasses.asdict(opt.default_config) == values
    obj = opt.protect("a", [torch.randn(3)], rank=2, damping=None)  # None keeps the default
    assert obj.config.rank == 2 and obj.config.damping == 0.5 and obj.config.mode == "conflict"
    assert opt.gradsafe_state_dict()["defaults"] == values


@pytest.mark.parametrize("where", ["constructor", "protect"])
def test_unknown_option_is_a_type_error_listing_the_options(where):
    with pytest.raises(TypeError, match="ranks.*objective options are"):
        if where == "constructor":
            _opt(ranks=3)
        else:
            opt, _ = _opt()
            opt.protect("a", [torch.randn(3)], ranks=3)


def test_explicit_none_in_the_constructor_is_validated():
    with pytest.raises(ValueError, match="unknown mode None"):
        _opt(mode=None)
