from pathlib import Path

import pytest
import yaml

from carclf.config import apply_overrides, load_config, parse_override, save_config
from carclf.errors import UserInputError

DEMO = Path(__file__).parents[1] / "jobs" / "configs" / "demo.yaml"


def test_demo_config_loads_with_the_contract_keys() -> None:
    cfg = load_config(DEMO)
    assert cfg.output_dir and cfg.data.manifest and cfg.model.name
    assert cfg.train.epochs >= 1 and cfg.scaling.num_workers == 2


def test_overrides_are_typed_and_nested() -> None:
    assert parse_override("train.lr=3e-4") == (["train", "lr"], 3e-4)
    assert parse_override("model.pretrained=true") == (["model", "pretrained"], True)
    out = apply_overrides({"train": {"lr": 1.0}}, ["train.lr=0.5", "model.kwargs.filters=[8,16]"])
    assert out == {"train": {"lr": 0.5}, "model": {"kwargs": {"filters": [8, 16]}}}


def test_unknown_key_names_the_file_and_key() -> None:
    with pytest.raises(UserInputError, match=r"demo\.yaml: train\.lrate"):
        load_config(DEMO, ["train.lrate=0.1"])


def test_bad_value_names_the_key() -> None:
    with pytest.raises(UserInputError, match=r"train\.epochs"):
        load_config(DEMO, ["train.epochs=-1"])


def test_malformed_override_and_missing_file() -> None:
    with pytest.raises(UserInputError, match="key=value"):
        load_config(DEMO, ["train.lr"])
    with pytest.raises(UserInputError, match="not found"):
        load_config("nope.yaml")


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config(DEMO, ["train.epochs=3"])
    written = save_config(cfg, tmp_path)
    assert load_config(written) == cfg
    assert yaml.safe_load(written.read_text())["train"]["epochs"] == 3


@pytest.mark.parametrize("path", sorted(DEMO.parent.glob("*.yaml")), ids=lambda p: p.name)
def test_every_committed_config_validates(path: Path) -> None:
    from carclf.models import check_model_name

    cfg = load_config(path)
    check_model_name(cfg.model.name)
    if cfg.tune is not None:
        from carclf.search.space import check_studies

        check_studies(cfg)
