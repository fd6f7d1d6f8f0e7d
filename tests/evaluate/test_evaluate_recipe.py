"""The recipe's `evaluate` section: validation messages and a resolved recipe that loads again."""

from __future__ import annotations

import pytest
import yaml

from tlcompile.errors import RecipeError
from tlcompile.recipe import load_recipe, validate_recipe_dict


def test_defaults_and_resolved_recipe_round_trip(tiny_recipe_dict, tmp_path):
    for evaluate in (
        {},
        {
            "operating_point": "sensitivity",
            "target_sensitivity": 0.87,
            "temperature_scaling": True,
            "endpoints": {"min_sensitivity": 0.85, "min_specificity": 0.825, "rule": "ci_lower_bound"},
        },
    ):
        recipe = validate_recipe_dict({**tiny_recipe_dict, "evaluate": evaluate})
        # recipe.resolved.yaml spells out every default; it must load as the same recipe.
        path = tmp_path / "resolved.yaml"
        path.write_text(yaml.safe_dump(recipe.to_yaml_dict()))
        assert load_recipe(path).fingerprint() == recipe.fingerprint()
    default = validate_recipe_dict(tiny_recipe_dict).evaluate
    assert default.operating_point == "youden" and default.target_sensitivity is None
    assert (
        default.endpoints.min_sensitivity is None
        and default.bootstrap_resamples == 2000
        and not default.temperature_scaling
    )


@pytest.mark.parametrize(
    ("evaluate", "message"),
    [
        (
            {"operating_point": "sensitivity"},
            "evaluate (line 2): operating_point 'sensitivity' needs target_sensitivity; valid: a fraction such as 0.87",
        ),
        ({"target_sensitivity": 0.9}, "target_sensitivity is 0.9 but operating_point is 'youden', which ignores it"),
        (
            {"operating_point": "sensitivity", "target_sensitivity": 1.0},
            "evaluate.target_sensitivity (line 4): 1.0: input should be less than 1",
        ),
        (
            {"endpoints": {"min_specificity": 1.5}},
            "evaluate.endpoints.min_specificity (line 4): 1.5: input should be less than or equal to 1",
        ),
        (
            {"endpoints": {"min_ppv": 0.5}},
            "unknown key 'min_ppv'; valid keys here: min_auc, min_sensitivity, min_specificity, rule",
        ),
        ({"operating_point": "f1"}, "'f1' is not valid; input should be 'youden' or 'sensitivity'"),
        (
            {"bootstrap_resamples": 50},
            "evaluate.bootstrap_resamples (line 3): 50: input should be greater than or equal to 100",
        ),
    ],
)
def test_evaluate_errors_name_key_line_and_valid_values(evaluate, message, write_recipe):
    path = write_recipe(
        "name: x\nevaluate:\n" + "".join(f"  {line}\n" for line in yaml.safe_dump(evaluate).splitlines())
    )
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert message in str(info.value) and "\n" not in str(info.value)
