"""Strict config loading and --set overrides."""

from __future__ import annotations

import pytest

from erasekit.config import EraseConfig, load_config, save_config
from erasekit.errors import ConfigError


def test_defaults_suit_flux_schnell():
    cfg = EraseConfig()
    assert cfg.model.id == "black-forest-labs/FLUX.1-schnell"
    assert cfg.sampling.steps == 4 and cfg.mask.init_lambda == 3.0
    assert cfg.mask.heads.enabled is False and cfg.mask.neurons.enabled and cfg.mask.norm.enabled


def test_yaml_and_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  iterations: 7\nmask:\n  neurons:\n    lr: 0.1\nconcept:\n  synonyms: [a, b]\n")
    cfg = load_config(
        recipe, ["train.iterations=9", "loss.sparsity_weight=1", "concept.anchor=a man", "model.revision=null"]
    )
    assert cfg.train.iterations == 9
    assert cfg.mask.neurons.lr == 0.1 and isinstance(cfg.loss.sparsity_weight, float)
    assert cfg.concept.synonyms == ["a", "b"] and cfg.concept.anchor == "a man" and cfg.model.revision is None
    save_config(cfg, tmp_path / "out.yaml")
    assert load_config(tmp_path / "out.yaml") == cfg


def test_base_config_sits_under_recipe_and_overrides(tmp_path):
    base = EraseConfig()
    base.sampling.steps, base.sampling.resolution = 12, 32
    recipe = tmp_path / "r.yaml"
    recipe.write_text("sampling:\n  steps: 8\n")
    cfg = load_config(recipe, ["sampling.guidance_scale=6"], base=base)
    assert (cfg.sampling.steps, cfg.sampling.resolution, cfg.sampling.guidance_scale) == (8, 32, 6.0)
    assert base.sampling.steps == 12 and base.sampling.guidance_scale == 0.0  # the base is not changed


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.nope=1", "unknown config key 'train.nope'; valid keys here: iterations"),
        ("nope.x=1", "unknown config key 'nope'"),
        ("train.iterations=abc", "train.iterations: expected an integer, got str 'abc'"),
        ("train.iterations=1.5", "expected an integer"),
        ("mask.heads.enabled=3", "expected true or false"),
        ("mask.parameterization=gumbel", "not one of sigmoid, hard_concrete, binary"),
        ("train=3", "train: expected a mapping"),
        ("train.iterations", "must look like key.path=value"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_config(None, [override])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("trainer:\n  epochs: 3\n")
    with pytest.raises(ConfigError, match="unknown config key 'trainer'"):
        load_config(unknown)


@pytest.mark.parametrize("key", ["loss.erase_weight", "mask.heads.lr", "mask.init_lambda", "sampling.guidance_scale"])
@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
def test_non_finite_numbers_are_refused(key, value):
    """NaN would only fail mid-training ("loss became nan"); an infinite learning rate wrote infinite logits."""
    with pytest.raises(ConfigError, match=f"{key}: expected a finite number"):
        load_config(None, [f"{key}={value}"])


def test_exponent_notation_is_a_number_in_recipes_and_overrides(tmp_path):
    """PyYAML (YAML 1.1) reads `1e-3` as the string '1e-3'; a float field takes it as the number."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("loss:\n  sparsity_weight: 1e-3\nmask:\n  neurons:\n    lr: 2.5E+1\n")
    config = load_config(recipe, ["mask.heads.lr=1e-3", "mask.norm.lr=-4E2", "sampling.guidance_scale=.5e1"])
    assert config.loss.sparsity_weight == 0.001 and type(config.loss.sparsity_weight) is float
    assert config.mask.neurons.lr == 25.0 and config.mask.heads.lr == 0.001 and config.mask.norm.lr == -400.0
    assert config.sampling.guidance_scale == 5.0
    # only exponent notation: other text is still refused, and an exponent does not make an integer
    for override, message in (
        ("mask.heads.lr='0.5'", "mask.heads.lr: expected a number, got str '0.5'"),
        ("mask.heads.lr=1e-3x", "mask.heads.lr: expected a number, got str '1e-3x'"),
        ("mask.heads.lr=1e999", "mask.heads.lr: expected a finite number, got inf"),
        ("train.iterations=1e3", "train.iterations: expected an integer, got str '1e3'"),
    ):
        with pytest.raises(ConfigError, match=f"^{message}$"):
            load_config(None, [override])


def test_recipes_in_configs_load():
    from pathlib import Path

    recipes = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
    assert recipes, "configs/ has no recipe"
    for recipe in recipes:
        load_config(recipe)


def test_every_method_accepts_each_family_recipe():
    """Each recipe of configs/ is valid for every registered method: its section passes the method's own
    checks (e.g. an ESD variant or a CA parameter group that exists), before any weights are loaded. The
    one refusal is SLD on the recipes that sample without classifier-free guidance (FLUX.1-schnell, the
    tiny CPU recipe)."""
    from pathlib import Path

    from erasekit.methods import available_methods, get_method

    refused = []
    for recipe in sorted((Path(__file__).parents[1] / "configs").glob("*.yaml")):
        for name in available_methods():
            config = load_config(recipe, ["concept.concept=a cat", f"method={name}"])
            try:
                get_method(name).validate(config)
            except ConfigError as exc:
                refused.append((recipe.name, name, str(exc)))
    assert [(r, m) for r, m, _ in refused] == [("flux-schnell.yaml", "sld"), ("tiny-flux-cpu.yaml", "sld")], refused
    assert all("needs sampling.guidance_scale above 1" in message for *_, message in refused)
