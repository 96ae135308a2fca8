"""The training config: TOML/JSON loading, field-named errors, save/load round trip, data-dependent defaults."""

import json
from pathlib import Path

import pytest

from trainers.config import DEFAULT_LEARNING_RATES, Config, default_steps, fill_template
from trainers.errors import ConfigError

TOML = """
[model]
base = "models/sd15.safetensors"

[data]
folder = "photos"
resolution = 768
trigger_word = "sks"
flip = true

[train]
method = "lora"
steps = 800
learning_rate = 2e-4

[lora]
rank = 8
alpha = 4

[output]
sample_prompts = ["a photo of sks", "sks on a beach"]
"""


def valid(**sections) -> Config:
    data = {"model": {"base": "base.safetensors"}, "data": {"folder": "images"}}
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return Config.from_dict(data)


def test_toml_loads_into_typed_sections(tmp_path: Path):
    path = tmp_path / "run.toml"
    path.write_text(TOML, encoding="utf-8")
    cfg = Config.load(path)
    assert (cfg.model.base, cfg.data.folder, cfg.data.resolution, cfg.data.flip) == (
        "models/sd15.safetensors", "photos", 768, True)
    assert (cfg.train.steps, cfg.train.learning_rate, cfg.lora.rank, cfg.lora.alpha) == (800, 2e-4, 8, 4.0)
    assert isinstance(cfg.lora.alpha, float)
    assert cfg.output.sample_prompts == ["a photo of sks", "sks on a beach"]
    assert cfg.dreambooth.enabled is False  # untouched sections keep their defaults
    cfg.validate()


def test_json_loads_and_whole_number_floats_become_ints(tmp_path: Path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"model": {"base": "x"}, "data": {"folder": "d"}, "train": {"batch_size": 4.0}}),
                    encoding="utf-8")
    cfg = Config.load(path)
    assert cfg.train.batch_size == 4 and isinstance(cfg.train.batch_size, int)


def test_save_then_load_round_trips(tmp_path: Path):
    cfg = valid(train={"steps": 321, "method": "full"}, output={"sample_prompts": ["a", "b"]})
    cfg.extra = {"textual_inversion": {"tokens": 4}}
    cfg.save(tmp_path / "out" / "config.json")
    assert Config.load(tmp_path / "out" / "config.json") == cfg
    assert not list((tmp_path / "out").glob("*.part"))  # written atomically, nothing left behind


@pytest.mark.parametrize("data, where, problem", [
    ({"lora": {"rnak": 4}}, "lora", "unknown setting(s) rnak"),
    ({"train": {"batch_size": "4"}}, "train.batch_size", "expected a whole number"),
    ({"train": {"batch_size": 1.5}}, "train.batch_size", "expected a whole number"),
    ({"data": {"flip": "yes"}}, "data.flip", "expected true or false"),
    ({"lora": {"alpha": True}}, "lora.alpha", "expected a number"),
    ({"model": {"base": 5}}, "model.base", "expected text"),
    ({"data": {"crop": "top"}}, "data.crop", "'top' is not allowed"),
    ({"train": {"method": "hypernetwork"}}, "train.method", "is not allowed"),
    ({"output": {"sample_prompts": "one prompt"}}, "output.sample_prompts", "expected a list of texts"),
    ({"lora": 5}, "lora", "expected a table"),
])
def test_loading_errors_name_the_field(data: dict, where: str, problem: str):
    with pytest.raises(ConfigError) as caught:
        Config.from_dict(data)
    assert caught.value.where == where and problem in caught.value.problem


def test_unknown_top_level_section_names_the_file(tmp_path: Path):
    path = tmp_path / "run.toml"
    path.write_text("[modle]\nbase = 'x'\n", encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        Config.load(path)
    assert caught.value.where == str(path) and "modle" in caught.value.problem and "model" in caught.value.fix


def test_missing_file_and_bad_syntax_name_the_file(tmp_path: Path):
    with pytest.raises(ConfigError, match="not found") as caught:
        Config.load(tmp_path / "missing.toml")
    assert caught.value.where == str(tmp_path / "missing.toml")
    for name, text in (("bad.toml", "[train\nsteps = 1"), ("bad.json", "{'train': 1}")):
        (tmp_path / name).write_text(text, encoding="utf-8")
        with pytest.raises(ConfigError, match="cannot parse") as caught:
            Config.load(tmp_path / name)
        assert caught.value.where == str(tmp_path / name)


def test_non_utf8_config_is_a_config_error(tmp_path: Path):
    path = tmp_path / "latin1.toml"
    path.write_bytes('[data]\ndefault_caption = "café"\n'.encode("latin-1"))
    with pytest.raises(ConfigError) as caught:
        Config.load(path)
    assert caught.value.where == str(path)


@pytest.mark.parametrize("sections, where", [
    ({"lora": {"rank": 0}}, "lora.rank"),
    ({"train": {"learning_rate": -1e-4}}, "train.learning_rate"),
    ({"train": {"learning_rate": float("nan")}}, "train.learning_rate"),
    ({"train": {"text_encoder_lr": -1.0}}, "train.text_encoder_lr"),
    ({"data": {"resolution": 513}}, "data.resolution"),
    ({"data": {"resolution": 24}}, "data.resolution"),
    ({"data": {"bucket_step": 60}}, "data.bucket_step"),
    ({"data": {"min_bucket_side": 2048, "max_bucket_side": 1024}}, "data.min_bucket_side"),
    ({"data": {"caption_dropout": 1.0}}, "data.caption_dropout"),
    ({"data": {"repeats": 0}}, "data.repeats"),
    ({"data": {"folder": ""}}, "data.folder"),
    ({"model": {"base": "  "}}, "model.base"),
    ({"train": {"batch_size": 0}}, "train.batch_size"),
    ({"train": {"noise_offset": 1.5}}, "train.noise_offset"),
    ({"full": {"ema_decay": 1.0}}, "full.ema_decay"),
    ({"output": {"name": "../escape"}}, "output.name"),
    ({"output": {"sample_every": -1}}, "output.sample_every"),
    ({"dreambooth": {"enabled": True}}, "data.class_noun"),
    ({"train": {"method": "full", "offload_unet": True}}, "train.offload_unet"),
])
def test_validate_rejects_bad_values_naming_the_field(sections: dict, where: str):
    cfg = valid(**sections)
    with pytest.raises(ConfigError) as caught:
        cfg.validate()
    assert caught.value.where == where and caught.value.fix
    assert str(caught.value).startswith(f"{where}: ")


def test_defaults_validate_once_model_and_data_are_given():
    valid().validate()
    valid(dreambooth={"enabled": True}, data={"class_noun": "dog"}).validate()


def test_bucket_step_above_resolution_is_an_error_only_with_buckets():
    """Without buckets the step is unused (one square bucket of `resolution`), so 32-px training takes its default."""
    valid(data={"resolution": 32, "buckets": False}).validate()
    with pytest.raises(ConfigError) as caught:
        valid(data={"resolution": 32, "buckets": True}).validate()
    assert caught.value.where == "data.bucket_step"


@pytest.mark.parametrize("images, steps", [(0, 400), (1, 400), (4, 400), (5, 500), (9, 900), (12, 1200), (50, 1200)])
def test_default_steps_are_100_per_image_clamped(images: int, steps: int):
    assert default_steps(images) == steps


def test_resolve_defaults_fills_data_dependent_values_without_touching_the_original():
    cfg = valid()
    resolved = cfg.resolve_defaults(num_images=7)
    lora_lr = DEFAULT_LEARNING_RATES["lora"]
    assert (resolved.train.steps, resolved.train.learning_rate, resolved.train.text_encoder_lr,
            resolved.train.warmup_steps) == (700, lora_lr, lora_lr / 2, 35)
    assert (cfg.train.steps, cfg.train.learning_rate, cfg.train.warmup_steps) == (0, 0.0, -1)


def test_resolve_defaults_keeps_explicit_values():
    cfg = valid(train={"method": "full", "steps": 50, "learning_rate": 1e-5, "warmup_steps": 0})
    resolved = cfg.resolve_defaults(num_images=3)
    assert (resolved.train.steps, resolved.train.learning_rate, resolved.train.text_encoder_lr,
            resolved.train.warmup_steps) == (50, 1e-5, 1e-5, 0)


def test_fill_template_replaces_and_collapses_spaces():
    assert fill_template("a photo of {trigger} {class}", "sks", "dog") == "a photo of sks dog"
    assert fill_template("a photo of {trigger} {class}", "", "dog") == "a photo of dog"


def test_the_readme_config_reference_is_generated_from_the_current_config():
    import config_reference

    assert config_reference.main(["--check"]) == 0, "run: python scripts/config_reference.py"


@pytest.mark.parametrize("name", ["a\x00b", "x" * 300, "bad\x1bname", "CON", "lpt1.backup", "trailing."])
def test_a_name_no_file_system_takes_is_refused_with_the_reason(name):
    cfg = Config.from_dict({"model": {"base": "x"}, "data": {"folder": "f"}, "output": {"name": name}})
    with pytest.raises(ConfigError, match="is not a usable file name") as refused:
        cfg.validate()
    assert refused.value.where == "output.name"


@pytest.mark.parametrize("extension", ["/x", "../txt", "", ".t\x00xt", "." + "x" * 40])
def test_a_caption_extension_that_is_not_one_is_refused(extension):
    cfg = Config.from_dict({"model": {"base": "x"}, "data": {"folder": "f", "caption_extension": extension}})
    with pytest.raises(ConfigError, match="is not a file extension") as refused:
        cfg.validate()
    assert refused.value.where == "data.caption_extension"


def test_a_safetensors_header_that_is_a_json_list_is_a_clear_model_error(tmp_path):
    import struct

    from trainers.errors import ModelError
    from trainers.plan import _model_size

    path = tmp_path / "odd.safetensors"
    header = b"[1, 2, 3]"
    path.write_bytes(struct.pack("<Q", len(header)) + header)

    with pytest.raises(ModelError, match="not a readable .safetensors file"):
        _model_size(str(path))
