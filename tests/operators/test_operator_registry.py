"""Each configuration maps to one operator, and each operator's part of the rule."""

from __future__ import annotations

import pytest

from gradsafe import ObjectiveConfig
from gradsafe.operators import (
    OPERATORS,
    ConflictProjection,
    Observe,
    OrthogonalProjection,
    RowSpan,
    ScaledProjection,
    operator_for,
)
from gradsafe.operators.scaled import penalty_of_strength


@pytest.mark.parametrize(
    "config, expected",
    [
        (dict(mode="project"), OrthogonalProjection),
        (dict(mode="project", strength=0.25), ScaledProjection),
        (dict(mode="project", strength=0.0), Observe),
        (dict(mode="observe"), Observe),
        (dict(mode="observe", strength=0.5), Observe),
        (dict(mode="conflict"), ConflictProjection),
        (dict(mode="conflict", references="samples"), ConflictProjection),
    ],
)
def test_registry_selects_one_operator(config, expected):
    cfg = ObjectiveConfig(**config)
    assert type(operator_for(cfg)) is expected
    assert sum(op.selects(cfg) for op in OPERATORS) == 1
    assert cfg.operator is operator_for(cfg)


def test_every_operator_names_its_paper_or_says_it_has_none():
    for op in OPERATORS:
        assert op.title
    for op in (OrthogonalProjection(), ScaledProjection(), ConflictProjection()):
        assert op.paper
        assert type(op).__module__.startswith("gradsafe.operators.")


def test_projection_rule_rows_hard_and_scaled():
    span = RowSpan(0, 4, 1, 0)
    hard = operator_for(ObjectiveConfig()).rule_rows(ObjectiveConfig(), span)
    assert hard.basis_rows == (0, 1, 2, 3) and hard.penalty == 0.0 and hard.constraint_rows == ()
    assert hard.apply_rows == slice(0, 4) and hard.acts
    soft_cfg = ObjectiveConfig(strength=0.2)
    soft = operator_for(soft_cfg).rule_rows(soft_cfg, span)
    assert soft.penalty == pytest.approx(penalty_of_strength(0.2)) == pytest.approx(4.0)


def test_conflict_rows_agem_and_gem():
    agem_cfg = ObjectiveConfig(mode="conflict")
    op = operator_for(agem_cfg)
    span = op.rows_read(agem_cfg, n_basis=5, n_samples=0)
    assert span == RowSpan(5, 0, 1, 0)  # the mean reference only, past the basis
    agem = op.rule_rows(agem_cfg, span)
    assert agem.constraint_rows == (0,) and agem.apply_rows == slice(0, 1) and agem.basis_rows == ()
    gem_cfg = ObjectiveConfig(mode="conflict", references="samples", rank=3)
    span = op.rows_read(gem_cfg, n_basis=5, n_samples=3)
    assert span == RowSpan(5, 0, 1, 3)
    gem = op.rule_rows(gem_cfg, span)
    assert gem.constraint_rows == (1, 2, 3) and gem.apply_rows == slice(1, 4)


def test_observe_reads_the_basis_and_acts_not():
    cfg = ObjectiveConfig(mode="observe")
    op = operator_for(cfg)
    span = op.rows_read(cfg, n_basis=2, n_samples=0)
    assert span == RowSpan(0, 2, 1, 0)
    rows = op.rule_rows(cfg, span)
    assert not rows.acts and rows.basis_rows == () and rows.constraint_rows == ()
    assert not cfg.acts and ObjectiveConfig().acts and ObjectiveConfig(mode="conflict").acts


@pytest.mark.parametrize(
    "config, message",
    [
        (dict(mode="conflict", strength=0.5), "strength applies to mode='project' only"),
        (dict(mode="conflict", scope="factored", references="samples"), "keeps one \\(projected\\) mean reference"),
    ],
)
def test_operator_checks(config, message):
    with pytest.raises(ValueError, match=message):
        ObjectiveConfig(**config)
