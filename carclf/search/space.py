"""A study's search space: trial configs, Tune domains, Optuna distributions.

A study (``tune.studies.<name>``) is fixed ``overrides`` plus a ``space`` of dotted config keys.
:func:`study_config` makes the train config of one trial; :func:`check_studies` refuses a bad
space before any trial starts. Choices whose values are lists (``model.kwargs.filters``) travel
through Tune and Optuna as their index (:func:`encode_params` / :func:`decode_params`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from carclf.config import Config, SearchParam, Study, set_key, validate_config
from carclf.errors import UserInputError
from carclf.models import check_model_name


def study_config(cfg: Config, study: Study, params: dict[str, Any], output_dir: Path) -> Config:
    """The train config of one trial: base config, the study's overrides, the sampled params."""
    raw = cfg.model_dump(mode="json", exclude={"tune"})
    for key, value in {**study.overrides, **params}.items():
        set_key(raw, key, value)
    raw["output_dir"] = str(output_dir)
    return validate_config(raw, source="tune")


def trial_config(cfg: Config, study: Study, params: dict[str, Any], output_dir: Path) -> Config:
    """What one trial trains: :func:`study_config` with ``tune.trial_workers`` workers."""
    trial = study_config(cfg, study, params, output_dir)
    workers = cfg.tune.trial_workers if cfg.tune else None
    if workers is None:
        return trial
    scaling = trial.scaling.model_copy(update={"num_workers": workers})
    return trial.model_copy(update={"scaling": scaling})


def check_studies(cfg: Config) -> None:
    """Refuse unknown parameters, unusable values and unknown models before any trial starts
    (exit code 2)."""
    if cfg.tune is None:
        raise UserInputError("tune: the config has no 'tune' section")
    for name, study in cfg.tune.studies.items():
        for key, param in study.space.items():
            for value in param.sample_values():
                try:
                    trial = study_config(cfg, study, {key: value}, Path(cfg.output_dir))
                    check_model_name(trial.model.name)
                except UserInputError as exc:
                    raise UserInputError(f"tune.studies.{name}.space.{key}: {exc}") from None
        for n, point in enumerate(study.start):
            try:
                study_config(cfg, study, point, Path(cfg.output_dir))
            except UserInputError as exc:
                raise UserInputError(f"tune.studies.{name}.start[{n}]: {exc}") from None


def _primitive(values: list[Any]) -> bool:
    return all(v is None or isinstance(v, bool | int | float | str) for v in values)


def decode_params(study: Study, params: dict[str, Any]) -> dict[str, Any]:
    """Sampled values → config values: choices of lists (``filters``) travel as their index,
    since Optuna's categorical distribution takes only plain values."""
    out = dict(params)
    for key, param in study.space.items():
        if key in out and param.type == "choice" and not _primitive(param.values):
            out[key] = param.values[int(out[key])]
    return out


def encode_params(study: Study, params: dict[str, Any]) -> dict[str, Any]:
    """Config values → sampled values: the inverse of :func:`decode_params`."""
    out = dict(params)
    for key, param in study.space.items():
        if key in out and param.type == "choice" and not _primitive(param.values):
            out[key] = param.values.index(out[key])
    return out


def tune_domain(param: SearchParam) -> Any:
    from ray import tune

    if param.type == "loguniform":
        return tune.loguniform(param.low, param.high)
    if param.type == "uniform":
        return tune.uniform(param.low, param.high)
    if param.type == "int":
        return tune.randint(int(param.low), int(param.high) + 1)
    if not _primitive(param.values):
        return tune.choice(list(range(len(param.values))))
    return tune.choice(param.values)


def optuna_distribution(param: SearchParam) -> Any:
    """A search dimension as Optuna sees it; choices as JSON text (lists are not Optuna values)."""
    from optuna import distributions as d

    if param.type == "choice":
        return d.CategoricalDistribution([json.dumps(v) for v in param.values])
    if param.type == "int":
        return d.IntDistribution(int(param.low), int(param.high))
    return d.FloatDistribution(param.low, param.high, log=param.type == "loguniform")


def optuna_value(param: SearchParam, value: Any) -> Any:
    return json.dumps(value) if param.type == "choice" else value
