import dataclasses

import pytest

from mmfusion.config import ConfigError, RunConfig, apply_overrides, from_dict, load_config, to_dict
from mmfusion.models import list_models


def test_shipped_configs_load_and_name_themselves():
    assert {"tiny", "small", "base"} <= set(list_models())
    for name in list_models():
        cfg = load_config(name)
        assert cfg.model.name == name
    assert load_config("tiny").model.vision.image_size == 64
    assert load_config("base").model.vision.image_size == 224


def test_overrides_are_typed():
    cfg = apply_overrides(load_config("tiny"), ["train.epochs=5", "model.vision.depth=3", "train.compile=true"])
    assert cfg.train.epochs == 5.0 and isinstance(cfg.train.epochs, float)
    assert cfg.model.vision.depth == 3
    assert cfg.train.compile is True
    assert apply_overrides(cfg, ["train.lr=2e-3"]).train.lr == 0.002  # YAML 1.1 reads this as a string
    with pytest.raises(ConfigError, match="expects int"):
        apply_overrides(cfg, ["model.vision.depth=three"])
    with pytest.raises(ConfigError, match="expects int"):
        apply_overrides(cfg, ["model.vision.depth=2.5"])


def test_string_values_are_verbatim_not_yaml():
    cfg = apply_overrides(RunConfig(), ["data.train=shards/{000000..000009}.tar", "data.val=a.tar::b.tar"])
    assert cfg.data.train == "shards/{000000..000009}.tar"
    assert cfg.data.val == "a.tar::b.tar"


def test_unknown_key_lists_valid_keys_and_suggests():
    with pytest.raises(ConfigError) as info:
        apply_overrides(RunConfig(), ["train.epoch=5"])
    message = str(info.value)
    assert "train.epoch" in message and "did you mean 'epochs'" in message and "batch_size" in message
    with pytest.raises(ConfigError, match="unknown key 'nope'"):
        from_dict(RunConfig, {"nope": 1})
    with pytest.raises(ConfigError, match="key.sub=value"):
        apply_overrides(RunConfig(), ["train.epochs"])


def test_unknown_key_in_yaml_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  batch_sise: 3\n")
    with pytest.raises(ConfigError, match="bad.yaml.*batch_sise"):
        load_config(path)


def test_round_trip_through_dict():
    cfg = apply_overrides(load_config("small"), ["train.betas=[0.9, 0.95]"])
    assert from_dict(RunConfig, to_dict(cfg)) == cfg
    assert cfg.train.betas == (0.9, 0.95)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.lr = 1.0


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.loss=foo", "train.loss' must be one of clip, siglip"),
        ("train.precision=fp16", "train.precision' must be one of auto, bf16, fp32"),
        ("train.batch_size=0", "batch_size' must be > 0"),
        ("train.log_every=0", "log_every' must be > 0"),
        ("model.vision.patch_size=7", "power of two with vision.stem=conv"),
        ("model.vision.patch_size=128", "multiple of vision.patch_size"),
        ("model.vision.stem=resnet", "vision.stem' must be one of patch, conv"),
        ("model.vision.stem_width=-1", "vision.stem_width must be >= 0"),
        ("model.vision.stem_full_res_width=-8", "vision.stem_full_res_width must be >= 0"),
        ("model.vision.stem_half_res_width=-8", "vision.stem_half_res_width must be >= 0"),
        ("data.crop_scale_min=0", "crop_scale_min"),
        ("model.generator.kind=diffusion", "generator.kind' must be one of masked, autoregressive"),
        ("model.generator.top_k=-1", "generator.top_k must be >= 0"),
        ("model.generator.guidance=-1", "generator.guidance must be >= 0"),
    ],
)
def test_values_are_checked(override, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(load_config("tiny"), [override])


def test_empty_or_scalar_sections(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("model:\ntrain:\n  steps: 3\n")
    cfg = load_config(empty)
    assert cfg.model.name == "empty" and cfg.train.steps == 3
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("model: tiny\n")
    with pytest.raises(ConfigError, match="section 'model' must be a mapping"):
        load_config(scalar)


def test_a_recipe_can_start_from_another(tmp_path):
    # The shipped one: tiny-fusion is tiny with the fusion head at batch 64, and nothing else.
    tiny, fused = to_dict(load_config("tiny")), to_dict(load_config("tiny-fusion"))
    tiny["model"]["fusion"]["enabled"], tiny["train"]["batch_size"], tiny["model"]["name"] = True, 64, "tiny-fusion"
    assert fused == tiny

    (tmp_path / "mine.yaml").write_text("base: small\nmodel:\n  vision: {depth: 2}\ndata:\ntrain:\n  lr: 0.5\n")
    (tmp_path / "child.yaml").write_text("base: mine.yaml\ntrain: {epochs: 3}\n")  # a path beside the file
    cfg, small = load_config(tmp_path / "child.yaml"), load_config("small")
    assert cfg.model.name == "child" and cfg.model.vision.depth == 2 and cfg.train.lr == 0.5 and cfg.train.epochs == 3
    assert cfg.model.vision.width == small.model.vision.width and cfg.data == small.data  # the rest is small's

    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="leads back to itself"):
        load_config(tmp_path / "loop.yaml")
    (tmp_path / "typo.yaml").write_text("base: tinny\n")
    with pytest.raises(ConfigError, match="typo.yaml: base: unknown config 'tinny'; available: .*tiny"):
        load_config(tmp_path / "typo.yaml")
