import pytest

from omniforge.config import OmniConfig, VisionConfig, apply_overrides, from_dict, load_config, save_config
from omniforge.errors import ConfigError

TINY = "recipes/models/tiny.yaml"


def test_tiny_preset_loads_with_every_part():
    config = load_config(TINY)
    assert config.llm.arch["model_type"] == "qwen2"
    assert config.vision.tile_size == 64 and config.vision.pool == 2
    assert config.audio.tokens_per_second == 12.5


def test_dotted_overrides_parse_values_as_yaml():
    config = load_config(TINY, ["vision.max_tiles=4", "audio.tokens_per_second=25", "llm.dtype=bfloat16",
                                "vision_adapter.hidden_size=null", "llm.arch.num_hidden_layers=1"])
    assert config.vision.max_tiles == 4 and isinstance(config.vision.max_tiles, int)
    assert config.audio.tokens_per_second == 25.0
    assert config.llm.dtype == "bfloat16"
    assert config.llm.arch["num_hidden_layers"] == 1


def test_exponent_floats_are_numbers_in_files_and_overrides(tmp_path):
    # PyYAML alone reads `2e-3` as a string (YAML 1.1 wants a dot); YAML 1.2 and people mean a float
    (tmp_path / "m.yaml").write_text("llm: {arch: {model_type: qwen2, rope_theta: 1e6}, tokenizer: byte-level}\n")
    assert load_config(tmp_path / "m.yaml").llm.arch["rope_theta"] == 1_000_000.0
    assert apply_overrides({}, ["a.lr=2e-3", "a.b=-1E+2", "a.name=e5"]) == {"a": {"lr": 0.002, "b": -100.0, "name": "e5"}}


def test_override_can_drop_a_part():
    assert load_config(TINY, ["audio=null"]).audio is None


@pytest.mark.parametrize("override, message", [
    (["vision.max_tile=4"], "vision.max_tile: unknown key; did you mean 'max_tiles'?"),
    (["vision.pool=two"], "vision.pool: expected int, got 'two'"),
    (["vision.pool=0"], "vision.pool: must be >= 1"),
    (["llm.dtype=float8"], "llm.dtype: expected one of"),
    (["audio.tokens_per_second=7"], "audio.tokens_per_second: must divide 50"),
    (["vision.patch_size=7"], "vision.patch_size: must divide tile_size=64"),
    (["vision.path=/x"], "vision: set exactly one of `path`"),
    (["vision.min_tiles=5"], "vision.min_tiles: must satisfy"),
    (["llm.arch.model_type=null"], "llm.arch.model_type: is required"),
    (["novel=1"], "novel: unknown key"),
    (["vision.tile_size"], "expected key=value"),
])
def test_bad_values_name_the_file_and_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(TINY, override)
    assert message in str(err.value)
    assert "tiny.yaml" in str(err.value) or "override" in str(err.value)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "absent.yaml")
    (tmp_path / "bad.yaml").write_text("llm: [unclosed")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(tmp_path / "bad.yaml")


def test_save_and_reload_round_trip(tmp_path):
    config = load_config(TINY, ["vision.max_tiles=6"])
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config


def test_list_items_are_addressed_by_index_or_name():
    data = {"stages": [{"name": "warmup", "steps": 5}, {"name": "sft", "steps": 9}], "evals": [{"limit": 3}]}
    out = apply_overrides(data, ["stages.1.lr=1e-3", "stages.warmup.steps=7", "evals.0.limit=8"])
    assert out["stages"] == [{"name": "warmup", "steps": 7}, {"name": "sft", "steps": 9, "lr": 0.001}]
    assert out["evals"] == [{"limit": 8}]
    with pytest.raises(ConfigError, match=r"stages.2: expected an index 0-1 or one of warmup, sft"):
        apply_overrides(data, ["stages.2.steps=1"])
    with pytest.raises(ConfigError, match=r"evals.first: expected an index 0-0$"):
        apply_overrides(data, ["evals.first.limit=1"])
    with pytest.raises(ConfigError, match=r"stages.0.steps is not a section"):
        apply_overrides(data, ["stages.0.steps.x=1"])


def test_overrides_do_not_mutate_input():
    data = {"vision": {"path": "a"}}
    out = apply_overrides(data, ["vision.pool=1"])
    assert data == {"vision": {"path": "a"}} and out["vision"]["pool"] == 1


def test_from_dict_builds_nested_dataclasses():
    config = from_dict(OmniConfig, {"llm": {"path": "p"}, "vision": {"path": "v", "tile_size": 384}})
    assert isinstance(config.vision, VisionConfig) and config.vision.tile_size == 384 and config.audio is None
