"""scope_megatron.utils.config_io: defaults < YAML < flags, strict types, documented fields."""
from dataclasses import dataclass
from typing import Optional, Tuple

import pytest

from scope_megatron.utils.config_io import (ConfigError, markdown_table, option, parse_config,
                                            save_config, section, to_dict)


@dataclass(frozen=True)
class Inner:
    lr: float = option(1e-3, help="learning rate", flag="--lr")
    steps: int = option(10, help="steps")
    name: Optional[str] = option(None, help="optional name")

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError("lr must be > 0")


@dataclass(frozen=True)
class Outer:
    train: Inner = section(Inner)
    flag: bool = option(False, help="a switch")
    sizes: Tuple[int, ...] = option((1, 2), help="a list")


def test_defaults_yaml_and_flags(tmp_path):
    assert parse_config(Outer, []) == Outer()
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("train:\n  lr: 0.5\n  steps: 3\nsizes: [4, 5, 6]\n")
    cfg = parse_config(Outer, ["--config", str(cfg_file), "--train-steps", "7", "--flag", "true"])
    assert cfg.train.lr == 0.5 and cfg.train.steps == 7 and cfg.flag is True and cfg.sizes == (4, 5, 6)
    assert parse_config(Outer, ["--lr", "2", "--sizes", "9,8"]).train.lr == 2.0
    assert parse_config(Outer, ["--train-name", "none"]).train.name is None


@pytest.mark.parametrize("argv,match", [
    (["--train-steps", "1.5"], "expected an integer"),
    (["--flag", "maybe"], "expected true/false"),
    (["--lr", "-1"], "lr must be > 0"),
])
def test_bad_values(argv, match):
    with pytest.raises(ConfigError, match=match):
        parse_config(Outer, argv)


def test_unknown_yaml_key_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lrr: 1\n")
    with pytest.raises(ConfigError, match=r"unknown key 'train.lrr'; valid keys here: \['lr', 'name', 'steps'\]"):
        parse_config(Outer, ["--config", str(bad)])
    with pytest.raises(ConfigError, match="does not exist"):
        parse_config(Outer, ["--config", str(tmp_path / "nope.yaml")])


def test_round_trip_and_docs(tmp_path):
    cfg = parse_config(Outer, ["--lr", "0.25", "--sizes", "3"])
    save_config(cfg, tmp_path / "saved.yaml")
    assert parse_config(Outer, ["--config", str(tmp_path / "saved.yaml")]) == cfg
    assert to_dict(cfg)["train"]["lr"] == 0.25
    table = markdown_table(Outer)
    assert "| `train.lr` | `--lr` | `0.001` | learning rate |" in table
    assert "`--train-steps`" in table


@dataclass(frozen=True)
class Sized:
    width: int = option(help="required in code, chosen by the parent config")
    depth: int = option(2, help="depth")

    def __post_init__(self):
        if self.width < 1:
            raise ValueError("width must be >= 1")


@dataclass(frozen=True)
class Parent:
    model: Sized = section(Sized, default_factory=lambda: Sized(width=8))


def test_sections_with_required_fields_take_the_parents_defaults():
    assert parse_config(Parent, []).model == Sized(width=8, depth=2)
    assert parse_config(Parent, ["--model-depth", "5"]).model == Sized(width=8, depth=5)
    with pytest.raises(ConfigError, match="config model: width must be >= 1"):
        parse_config(Parent, ["--model-width", "0"])
    assert "| `model.width` | `--model-width` | `8` |" in markdown_table(Parent)


def test_training_entry_point_reports_config_errors_without_a_traceback(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "pretrain_scope.py"
    bad = tmp_path / "bad.yaml"
    bad.write_text("training:\n  train_iterz: 7\n")
    for argv, message in ((["--config", str(bad)], "config: unknown key 'training.train_iterz'; valid keys here: "),
                          (["--lr", "-1"], "config optimizer: need 0 <= min_lr <= lr and lr > 0")):
        r = subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True,
                           timeout=300, cwd=tmp_path)
        assert r.returncode == 2, r.stderr
        assert "Traceback" not in r.stderr and f"pretrain_scope.py: error: {message}" in r.stderr, r.stderr
    assert list(tmp_path.iterdir()) == [bad]
