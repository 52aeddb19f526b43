"""Mixture configuration: presets, files and dicts agree; bad configs name the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moa.config import PRESETS, MixtureConfig, StaircaseConfig, load, load_file, preset
from moa.errors import ConfigError

TOML = """
name = "pair"
mode = "staircase"
deadline_s = 30

[[layers]]
min_proposers = 2
agents = [
  { model = "openai/gpt-4o-mini", temperature = 0.5 },
  { model = "together/Qwen/Qwen2.5-7B-Instruct-Turbo", n = 2 },
]

[aggregator]
model = "openai/gpt-4o"
max_tokens = 256

[staircase]
chunk_tokens = [8, 32]
layout = "cache"
"""


def test_preset_shapes_and_call_counts() -> None:
    moa, lite, self_moa, local = (preset(n) for n in ("moa", "moa-lite", "self-moa", "local"))
    assert [len(layer.agents) for layer in moa.layers] == [6, 6] and moa.call_count == 13
    assert len(lite.layers) == 1 and lite.call_count == 7
    assert self_moa.layers[0].agents[0].n == 6 and self_moa.call_count == 7
    assert {a.model for a in self_moa.agents()} == {self_moa.aggregator.model}
    assert {a.model for a in local.agents()} == {"local/smollm2"} and local.call_count == 4
    for name in PRESETS:
        assert f"({preset(name).call_count} calls)" in PRESETS[name]


def test_toml_json_dict_and_objects_give_the_same_config(tmp_path: Path) -> None:
    toml_path = tmp_path / "m.toml"
    toml_path.write_text(TOML)
    from_toml = load_file(toml_path)
    json_path = tmp_path / "m.json"
    json_path.write_text(json.dumps(from_toml.model_dump()))
    assert load(str(json_path)) == from_toml
    assert load(from_toml.model_dump()) == from_toml
    assert MixtureConfig.model_validate(from_toml.model_dump()) == from_toml
    assert from_toml.layers[0].min_proposers == 2 and from_toml.call_count == 4
    assert from_toml.staircase.chunk_size(0) == 8 and from_toml.staircase.chunk_size(5) == 32


def test_preset_key_in_a_file_is_overridden_by_the_file(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text('preset = "moa-lite"\nmode = "layered"\ndeadline_s = 9\n')
    config = load(path)
    assert config.mode == "layered" and config.deadline_s == 9
    assert config.layers == preset("moa-lite").layers


@pytest.mark.parametrize(
    ("data", "field"),
    [
        (
            {"layers": [{"agents": [{"model": "nope/x"}]}], "aggregator": {"model": "openai/a"}},
            "layers.0.agents.0.model",
        ),
        (
            {"layers": [{"agents": [{"model": "openai/a"}]}], "aggregator": {"model": "zz/b"}},
            "aggregator.model",
        ),
        ({"layers": [{"agents": []}], "aggregator": {"model": "openai/a"}}, "layers.0.agents"),
        ({"layers": [], "aggregator": {"model": "openai/a"}}, "layers"),
        (
            {
                "layers": [{"agents": [{"model": "openai/a", "temperature": -0.1}]}],
                "aggregator": {"model": "openai/a"},
            },
            "layers.0.agents.0.temperature",
        ),
        (
            {
                "layers": [{"agents": [{"model": "openai/a"}], "min_proposers": 3}],
                "aggregator": {"model": "openai/a"},
            },
            "layers.0",
        ),
        (
            {"layers": [{"agents": [{"model": "gpt-4o"}]}], "aggregator": {"model": "openai/a"}},
            "layers.0.agents.0",
        ),
        ({"preset": "mo", "mode": "layered"}, "preset"),
        ({"preset": "moa", "mode": "fast"}, "mode"),
        ({"preset": "moa", "staircase": {"chunk_tokens": [0]}}, "staircase.chunk_tokens.0"),
    ],
)
def test_bad_configs_name_the_field(data: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=f"field '{field}'"):
        load(data)


def test_unknown_preset_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"Unknown preset 'mao'.*moa-lite"):
        load("mao")
    bad = tmp_path / "bad.toml"
    bad.write_text("[[layers]\nagents = 1")
    with pytest.raises(ConfigError, match=r"bad.toml' is malformed"):
        load(bad)
    broken = tmp_path / "bad.json"
    broken.write_text("{")
    with pytest.raises(ConfigError, match=r"bad.json' is malformed"):
        load(str(broken))
    with pytest.raises(ConfigError, match="Cannot read config file"):
        load(tmp_path / "missing.toml")


def test_staircase_schedules_repeat_their_last_size() -> None:
    sc = StaircaseConfig(chunk_tokens=[4, 8], step_tokens=[2])
    assert [sc.chunk_size(i) for i in range(4)] == [4, 8, 8, 8]
    assert [sc.step_size(i) for i in range(3)] == [2, 2, 2]
