"""Config: YAML round trip, unknown keys and bad values are errors, overrides, presets load."""

from __future__ import annotations

import pytest

from scarce.config import (
    ConfigError,
    TrainConfig,
    config_from_dict,
    config_to_dict,
    load_config,
    override,
    preset_names,
    save_config,
)


def test_yaml_round_trip(tmp_path):
    cfg = override(
        TrainConfig(), {"data.percentiles": [2, 98], "augment.elastic": True, "max_minutes": 3}
    )
    save_config(cfg, tmp_path / "c.yaml")
    back = load_config(tmp_path / "c.yaml")
    assert back == cfg and back.data.percentiles == (2.0, 98.0)
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_unknown_key_names_the_file_and_valid_keys(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  bach_size: 4\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*data.*bach_size.*batch_size"):
        load_config(path)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("data.batch_size", "four"),
        ("model.norm", "layer"),
        ("augment.elastic", "3"),
        ("predict.overlap", "1.5"),
        ("predict.min_object_score", "1.2"),
    ],
)
def test_bad_values_are_refused(key, value):
    with pytest.raises(ConfigError):
        override(TrainConfig(), {key: value})


def test_unquoted_yaml_off_means_the_string(tmp_path):
    # YAML 1.1 reads `amp: off` as false; the string field takes it as "off"
    assert override(TrainConfig(), {"amp": "off"}).amp == "off"
    (tmp_path / "c.yaml").write_text("amp: off\n")
    assert load_config(tmp_path / "c.yaml").amp == "off"
    with pytest.raises(ConfigError, match="amp"):
        override(TrainConfig(), {"amp": "on"})


def test_variable_length_tuple_reads_a_list(tmp_path):
    cfg = override(TrainConfig(), {"model.widths": "[32, 32, 64, 128, 256]"})
    assert cfg.model.widths == (32, 32, 64, 128, 256)
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml").model.widths == (32, 32, 64, 128, 256)
    with pytest.raises(ConfigError, match="model.widths"):
        override(TrainConfig(), {"model.widths": "32"})


def test_override_unknown_key():
    with pytest.raises(ConfigError, match="unknown config key"):
        override(TrainConfig(), {"data.nope": 1})


@pytest.mark.parametrize("preset", [n for n in preset_names() if not n.startswith("align")])
def test_presets_load(preset):
    cfg = load_config(preset)
    assert cfg.data.patch_size % 2**cfg.model.depth == 0
