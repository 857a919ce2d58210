import pytest

from lmpress.compress.recipe import Recipe, RecipeError, builtin_recipes
from lmpress.quant.scheme import W4A16, W8A8, QuantArgs, QuantScheme

BASIC = """
version: 1
name: custom
schemes:
  lm_head: null
  down_proj: W8A8
  "re:.*layers\\\\.0\\\\..*": {preset: W4A16, weights: {group_size: 32, symmetric: false}}
  "re:.*": W4A16
kv_cache: KV4
stages:
  - rtn: {}
"""


def test_builtin_recipes_round_trip_exactly():
    names = builtin_recipes()
    assert {"w8a8-rtn", "w4a16-rtn"} <= set(names)
    for name, desc in names.items():
        assert desc, f"{name} has no description"
        r = Recipe.load(name)
        text = r.to_yaml()
        again = Recipe.from_yaml(text)
        assert again == r
        assert again.to_yaml() == text


def test_custom_recipe_round_trip_and_scheme_map():
    r = Recipe.from_yaml(BASIC)
    assert Recipe.from_yaml(r.to_yaml()) == r
    assert r.scheme_for("lm_head") is None
    assert r.scheme_for("model.layers.3.mlp.down_proj") == W8A8
    assert r.scheme_for("model.layers.1.self_attn.q_proj") == W4A16
    s = r.scheme_for("model.layers.0.self_attn.q_proj")
    assert s.weights == QuantArgs(bits=4, granularity="group", group_size=32, symmetric=False)
    assert r.kv_args.bits == 4


@pytest.mark.parametrize(
    "text, needle",
    [
        ("version: 1\nschemes: {}\nstages: [{rtn: {}}]\nbogus: 1\n", "unknown recipe key(s) ['bogus']"),
        ("version: 2\nstages: [{rtn: {}}]\n", "version 2 is not supported"),
        ("stages: [{nope: {}}]\n", "unknown stage 'nope'; known stages: "),
        ("stages: [{rtn: {foo: 1}}]\n", "unknown option(s) ['foo']"),
        ("schemes: {'re:.*': W7A7}\nstages: [rtn]\n", "unknown scheme preset 'W7A7'"),
        ("schemes: {'re:.*': {weights: {bits: 7}}}\nstages: [rtn]\n", "bits=7 is not supported"),
        ("schemes: {'re:.*': {weights: {bits: 4, granularity: group}}}\nstages: [rtn]\n", "needs a positive integer group_size"),
        ("schemes: {'re:(': W4A16}\nstages: [rtn]\n", "not a valid regex"),
        ("kv_cache: {bits: 3}\nstages: [rtn]\n", "kv_cache: KVCacheArgs.bits=3"),
        ("stages: []\n", "at least one stage"),
        ("schemes: [1, 2]\nstages: [rtn]\n", "schemes: must be a mapping"),
        ("- a\n- b\n", "a recipe is a mapping"),
        (": : :\n", "not valid YAML"),
    ],
)
def test_recipe_errors_name_the_key(text, needle):
    with pytest.raises(RecipeError) as e:
        Recipe.from_yaml(text)
    assert needle in str(e.value)


def test_unknown_recipe_name_lists_builtins(tmp_path):
    with pytest.raises(RecipeError, match="built-in recipes: .*w8a8-rtn"):
        Recipe.load("w9a9")
    with pytest.raises(RecipeError, match="does not exist"):
        Recipe.load(tmp_path / "missing.yaml")


def test_scheme_validation_messages():
    with pytest.raises(ValueError, match="granularity 'token' is computed at run time"):
        QuantArgs(bits=8, granularity="token")
    with pytest.raises(ValueError, match="only meaningful with granularity 'group'"):
        QuantArgs(bits=4, group_size=64)
    with pytest.raises(ValueError, match="clip_ratio"):
        QuantArgs(bits=4, clip_ratio=1.5)
    with pytest.raises(ValueError, match="nothing to do"):
        QuantScheme()
    assert W8A8.name == "W8A8"


def test_a_recipe_owns_its_specs():
    body = {"weights": {"bits": 4}, "inputs": {"bits": 4, "granularity": "token", "dynamic": True}}
    kv = {"bits": 4}
    recipe = Recipe.from_dict({"version": 1, "name": "t", "schemes": {"re:.*": body}, "kv_cache": kv, "stages": ["rtn"]})
    yaml_before = recipe.to_yaml()
    body["inputs"]["bits"] = 8  # the caller's dicts change after the fact
    kv["bits"] = 2
    out = recipe.to_dict()
    out["schemes"]["re:.*"]["weights"]["bits"] = 3  # and so does what to_dict gave
    out["kv_cache"]["bits"] = 8
    assert recipe.to_yaml() == yaml_before
