"""pipelines/distill/params.py: the grid's shape and what every cell shares, refused before any training when
a name, an option or a value cannot run."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from warmup_distill_kedro.pipelines.distill.params import DistillParams

TRAINING = {"max_steps": 1, "batch_size": 2, "learning_rate": 1e-3}


@pytest.mark.parametrize(
    ("changes", "says"),
    [
        ({"chunk_size": None}, "fused_head: true needs chunk_size"),
        (
            {"objectives": ["dskd", "sft"]},
            r"fused_head: true applies to the token-level objectives.*has none",
        ),
    ],
)
def test_fused_head_is_refused_where_it_cannot_apply(changes, says):
    fields = {
        "objectives": ["fkl"],
        "chunk_size": 8,
        "fused_head": True,
        "training": {"max_steps": 1, "batch_size": 2, "learning_rate": 1e-3},
    }
    with pytest.raises(ValueError, match=says):
        DistillParams(**{**fields, **changes})


def test_fused_head_is_accepted_beside_dskd_and_sft_cells():
    params = DistillParams(
        objectives=["fkl", "dskd", "sft"],
        chunk_size=8,
        fused_head=True,
        training={"max_steps": 1, "batch_size": 2, "learning_rate": 1e-3},
    )
    assert params.fused_head


@pytest.mark.parametrize("temperature", [float("inf"), float("nan")])
def test_a_temperature_that_is_not_finite_is_refused(temperature):
    with pytest.raises(ValidationError, match="temperature"):
        DistillParams(objectives=["fkl"], temperature=temperature, training=TRAINING)


@pytest.mark.parametrize(
    ("options", "says"),
    [
        ({"kl2": {}}, r"options\.kl2: unknown objective 'kl2'"),
        ({"js": {"beta": 0.0}}, r"options\.js: .*'beta'"),
        ({"akl": {"alpha": 0.1}}, r"options\.akl: unknown option 'alpha'"),
    ],
)
def test_a_bad_objective_option_names_its_objective(options, says):
    with pytest.raises(ValidationError, match=says):
        DistillParams(objectives=["fkl"], options=options, training=TRAINING)


@pytest.mark.parametrize(
    ("grid", "says"),
    [
        ({"variants": ["vanilla", "student"]}, r"distill\.variants: unknown \['student'\]; choose from"),
        ({"objectives": ["fkl", "kl"]}, r"distill\.objectives: unknown \['kl'\]; choose from"),
    ],
)
def test_an_unknown_grid_name_names_the_parameter(grid, says):
    with pytest.raises(ValidationError, match=says):
        DistillParams(**{"objectives": ["fkl"], **grid, "training": TRAINING})


def test_the_default_variants_and_the_fields_every_cell_shares():
    params = DistillParams(objectives=["fkl", "sft"], training=TRAINING)
    assert params.variants == ["vanilla", "warmup"]
    assert (params.temperature, params.kd_rate, params.fused_head) == (2.0, 0.5, False)
    with pytest.raises(ValidationError, match="objectives"):
        DistillParams(objectives=[], training=TRAINING)


def test_the_grid_given_as_names_separated_by_spaces():
    """What `--params 'distill.variants=warmup control,distill.objectives=fkl sft'` gives: strings."""
    params = DistillParams(variants="warmup control", objectives="fkl sft", training=TRAINING)
    assert (params.variants, params.objectives) == (["warmup", "control"], ["fkl", "sft"])


def test_seeds_default_to_the_training_seed_and_refuse_a_second_place():
    assert DistillParams(objectives=["fkl"], training={**TRAINING, "seed": 4}).seeds == [4]
    assert DistillParams(objectives=["fkl"], training=TRAINING, seeds="0 1").seeds == [0, 1]
    with pytest.raises(ValidationError, match=r"distill.seeds \(\[0, 1\]\) and distill.training.seed \(4\)"):
        DistillParams(objectives=["fkl"], training={**TRAINING, "seed": 4}, seeds=[0, 1])
