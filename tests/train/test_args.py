"""TrainConfig: help text from field docstrings, type coercion, validation, YAML + flag precedence."""

import dataclasses

import pytest

from bdh.cli import build_parser, train_config_from_args
from bdh.errors import UserError
from bdh.train.args import TrainConfig, field_help, load_yaml_config


def test_every_field_has_a_one_line_help():
    helps = field_help()
    for f in dataclasses.fields(TrainConfig):
        assert helps.get(f.name), f.name
        assert "\n" not in helps[f.name]


def test_yaml_strings_are_coerced_and_checked(tmp_path):
    assert TrainConfig(lr="1e-3", batch_size="4", stream="true").lr == 1e-3
    with pytest.raises(UserError, match="batch_size must be an integer"):
        TrainConfig(batch_size=2.5)
    with pytest.raises(UserError, match="lr must be a number"):
        TrainConfig(lr="fast")


@pytest.mark.parametrize("values, message", [
    (dict(batch_size=0), "batch_size must be a positive"),
    (dict(block_size=-1), "block_size must be a positive"),
    (dict(grad_accum=0), "grad_accum"),
    (dict(lr=0.0), "lr must be positive"),
    (dict(lr=1e-4, min_lr=1e-3), "min_lr"),
    (dict(decay="step"), "decay must be one of"),
    (dict(device="tpu"), "device must be"),
    (dict(max_minutes=0), "max_minutes"),
    (dict(val_fraction=1.0), "val_fraction"),
    (dict(warmup_iters=10, decay_iters=5), "decay_iters"),
])
def test_invalid_values_are_user_errors(values, message):
    with pytest.raises(UserError, match=message):
        TrainConfig(**values)


def test_yaml_then_flags_precedence(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("batch_size: 3\nblock_size: 32\nlr: 3e-4\nmodel:\n  dropout: 0.2\n  n_layer: 3\n")
    args = build_parser().parse_args(["train", "--config", str(config), "--batch-size", "5",
                                      "--model-arg", "n_layer=4"])
    cfg, resumed = train_config_from_args(args)
    assert resumed is None
    assert (cfg.batch_size, cfg.block_size, cfg.lr) == (5, 32, 3e-4)
    assert cfg.model_overrides == {"dropout": 0.2, "n_layer": 4}
    assert cfg.out_dir.as_posix() == "runs/small"


def test_yaml_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("batch_size: 3\nnot_a_field: 1\n")
    with pytest.raises(UserError, match="bad.yaml.*not_a_field"):
        load_yaml_config(bad)
    bad.write_text("- a list\n")
    with pytest.raises(UserError, match="mapping"):
        load_yaml_config(bad)
    with pytest.raises(UserError, match="cannot read"):
        load_yaml_config(tmp_path / "missing.yaml")


def test_example_configs_load():
    from pathlib import Path

    from bdh.train.loop import build_model_config

    paths = sorted(Path(__file__).parents[2].joinpath("configs").glob("*.yaml"))
    for path in paths:
        cfg = TrainConfig.from_dict(load_yaml_config(path), where=str(path))
        build_model_config(cfg, vocab_size=256)
    assert paths
