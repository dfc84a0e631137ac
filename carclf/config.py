"""Configuration: YAML file → ``--set`` overrides → validated pydantic model → plain dict into Ray.

The models here are the only schema of a carclf config. Workers re-validate the dict they are
handed (``Config.model_validate``), and every output directory gets the resolved ``config.yaml``
so that a run can be reproduced from what it wrote.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from carclf.collapse import CollapseRule
from carclf.errors import UserInputError


class _Strict(BaseModel):
    """Unknown keys are errors: a typo in a config must not be silently ignored."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class DataConfig(_Strict):
    manifest: str | None = None
    root: str | None = None
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes per train worker")
    loader: Literal["torch", "ray"] = Field(
        "torch", description="torch: a DataLoader per worker; ray: a Ray Data pipeline, sharded"
    )
    augment: Literal["none", "basic", "randaugment", "trivialaugment"] = Field(
        "basic", description="training augmentation policy; true/false mean basic/none"
    )
    balanced_sampling: bool = Field(
        False, description="draw training images with weights 1/class count (torch loader)"
    )
    # A quick search or ablation on a subset; validation and test stay whole, so scores compare.
    train_per_class: int | None = Field(
        None, ge=1, description="at most this many training images per class (a seeded choice)"
    )
    cache: bool = Field(
        False, description="keep decoded, resized images in memory after the first epoch"
    )
    augment_magnitude: int = Field(
        9, ge=0, le=30, description="RandAugment magnitude (of 10; timm's scale), randaugment only"
    )
    random_erasing: float = Field(
        0.0, ge=0.0, le=1.0, description="probability of erasing a random box (timm, per-pixel)"
    )
    crop_scale: tuple[float, float] = Field(
        (0.6, 1.0), description="random-resized-crop area fractions (low, high) of the image"
    )

    @field_validator("augment", mode="before")
    @classmethod
    def _augment_bool(cls, value: Any) -> Any:
        # Older configs say augment: true/false.
        if isinstance(value, bool):
            return "basic" if value else "none"
        return value

    @model_validator(mode="after")
    def _one_source(self) -> DataConfig:
        if not self.manifest and not self.root:
            raise ValueError("set data.manifest (a Parquet manifest) or data.root (an image tree)")
        if self.balanced_sampling and self.loader == "ray":
            raise ValueError(
                "balanced_sampling needs data.loader=torch (no weighted Ray Data draw)"
            )
        return self


class ModelConfig(_Strict):
    name: str = "resnet10t"
    pretrained: bool = False
    pretrained_file: str | None = None
    img_size: int | None = Field(None, gt=0, description="input side; None keeps the model's")
    crop_pct: float | None = Field(None, gt=0.0, le=1.0, description="None keeps the model's")
    crop_mode: Literal["center", "squash"] | None = Field(
        None,
        description="center keeps the aspect ratio and crops the long side; squash resizes "
        "each side to fit and keeps the whole image (photos of cars are about 2:1); None "
        "keeps the model's (center)",
    )
    drop_rate: float = Field(0.0, ge=0.0, lt=1.0)
    drop_path_rate: float = Field(
        0.0, ge=0.0, lt=1.0, description="stochastic depth of the residual blocks (timm models)"
    )
    head_hidden: int = Field(
        0, ge=0, description="hidden units of a two-layer MLP head; 0 keeps one linear layer"
    )
    kwargs: dict[str, Any] = Field(default_factory=dict, description="extra model arguments")

    @model_validator(mode="after")
    def _file_means_pretrained(self) -> ModelConfig:
        # Otherwise a file the user named would be silently ignored and the model train from
        # random init.
        if self.pretrained_file and not self.pretrained:
            raise ValueError(
                "model.pretrained_file is set but model.pretrained is false: set "
                "model.pretrained: true to load it, or model.pretrained_file: null"
            )
        return self


class TrainConfig(_Strict):
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(32, ge=1, description="global batch, split across workers")
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(0.05, ge=0.0)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    layer_decay: float | None = Field(None, gt=0.0, le=1.0, description="layer-wise LR decay")
    head_lr_scale: float = Field(
        1.0, gt=0.0, description="the classifier head's learning rate as a multiple of train.lr"
    )
    scheduler: Literal["cosine", "onecycle", "plateau", "none"] = "cosine"
    warmup_epochs: int = Field(0, ge=0)
    plateau_patience: int = Field(2, ge=0)
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    mixup: float = Field(0.0, ge=0.0, description="mixup alpha; 0 is off")
    cutmix: float = Field(0.0, ge=0.0, description="cutmix alpha; 0 is off")
    freeze_epochs: int = Field(0, ge=0, description="epochs with only the head trainable")
    freeze_bn_stats: bool = Field(
        False,
        description="BatchNorm keeps its pretrained statistics (eval mode) the whole run; its "
        "weights still train. For small data sets and small per-worker batches",
    )
    head_init: Literal["random", "linear_probe"] = Field(
        "random",
        description="linear_probe: before epoch 0, solve the head by logistic regression on the "
        "frozen backbone's features (LP-FT; carclf/probe.py)",
    )
    unfreeze_blocks: int | None = Field(None, ge=1, description="after freezing: last K blocks")
    unfreeze_step: int | None = Field(
        None,
        ge=1,
        description="progressive unfreezing: after the frozen phase, this many more blocks "
        "(from the top) each epoch, up to unfreeze_blocks or all",
    )
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"
    ema_decay: float | None = Field(None, gt=0.0, lt=1.0)
    grad_clip: float | None = Field(None, gt=0.0)
    early_stopping_patience: int | None = Field(None, ge=1)
    monitor: Literal["val_acc", "val_f1_macro", "val_loss"] = "val_acc"
    max_failures: int = Field(0, ge=-1)

    @model_validator(mode="after")
    def _freeze_within_epochs(self) -> TrainConfig:
        if self.freeze_epochs >= self.epochs:
            raise ValueError(f"freeze_epochs ({self.freeze_epochs}) must be below epochs")
        return self


class ScalingConfig(_Strict):
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0.0)


class ExportConfig(_Strict):
    parity_images: int = Field(32, ge=1, description="test images the ONNX parity check runs")
    atol: float = Field(1e-4, gt=0.0, description="max abs logit difference ONNX vs PyTorch")
    opset: int = Field(18, ge=13)
    quantize: bool = Field(
        False,
        description="also try onnxruntime INT8 static quantisation; kept only when measured "
        "faster and within max_accuracy_drop (carclf/quantize.py)",
    )
    calibration_images: int = Field(64, ge=1, description="training images that calibrate INT8")
    max_accuracy_drop: float = Field(
        0.5, ge=0.0, description="accuracy points INT8 may lose on the test split and be kept"
    )
    tta: Literal["none", "flip"] = Field(
        "none",
        description="test-time augmentation of the exported model and of `carclf evaluate`: "
        "flip averages the logits of each image and its mirror (twice the inference cost); "
        "validation during training never uses it",
    )


class SearchParam(_Strict):
    """One dimension of a search space: a range (loguniform, uniform, int) or choices."""

    type: Literal["loguniform", "uniform", "int", "choice"]
    low: float | None = None
    high: float | None = None
    values: list[Any] | None = None

    @model_validator(mode="after")
    def _non_empty(self) -> SearchParam:
        if self.type == "choice":
            if not self.values:
                raise ValueError("choice needs a non-empty 'values' list")
        elif self.low is None or self.high is None or not self.low < self.high:
            raise ValueError(f"{self.type} needs low < high, got {self.low}..{self.high}")
        elif self.type == "loguniform" and self.low <= 0:
            raise ValueError("loguniform needs low > 0")
        return self

    def sample_values(self) -> list[Any]:
        """Values that span the dimension, for checking it against the config schema."""
        if self.type == "choice":
            return list(self.values or [])
        if self.type == "int":
            return [int(self.low), int(self.high)]
        return [self.low, self.high]

    def contains(self, value: Any) -> bool:
        """Whether ``value`` is one this dimension can take."""
        if self.type == "choice":
            return value in (self.values or [])
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        if self.type == "int" and value != int(value):
            return False
        return self.low <= value <= self.high


class Study(_Strict):
    """One search of an experiment: fixed overrides plus a search space (dotted config keys)."""

    overrides: dict[str, Any] = Field(default_factory=dict)
    space: dict[str, SearchParam]
    start: list[dict[str, Any]] = Field(
        default_factory=list,
        description="points tried first, before the searcher samples (e.g. a recipe known to "
        "work); each gives a value for every parameter of the space and counts as a trial",
    )

    @model_validator(mode="after")
    def _start_in_space(self) -> Study:
        for n, point in enumerate(self.start):
            if set(point) != set(self.space):
                missing, extra = set(self.space) - set(point), set(point) - set(self.space)
                raise ValueError(
                    f"start[{n}] must give every parameter of the space: missing "
                    f"{sorted(missing)}, not in the space {sorted(extra)}"
                )
            for key, value in point.items():
                if not self.space[key].contains(value):
                    raise ValueError(f"start[{n}].{key}: {value!r} is outside the space")
        return self


class TuneSection(_Strict):
    """``carclf tune``: Optuna (TPE) or random search with ASHA, and collapse detection."""

    metric: str = "val_acc"
    mode: Literal["max", "min"] = "max"
    num_samples: int = Field(8, ge=1, description="trials per study")
    max_concurrent: int = Field(1, ge=1)
    searcher: Literal["optuna", "random"] = "optuna"
    startup_trials: int = Field(
        10, ge=1, description="Optuna TPE: trials drawn at random before TPE models the space"
    )
    scheduler: Literal["asha", "fifo"] = "asha"
    grace_period: int = Field(2, ge=1, description="ASHA: epochs before a trial may be cut")
    reduction_factor: float = Field(2.0, gt=1.0)
    # A trial only drives its Ray Train run; the workers hold the real CPUs. Tune needs a
    # non-empty request, so the driver takes a sliver of a CPU.
    trial_cpus: float = Field(0.01, gt=0.0, description="CPUs of each trial's driver actor")
    # 1 makes every trial train inside its own Tune trial (no Ray Train start-up); the winner's
    # final run (`carclf pipeline`, best_config.yaml) keeps scaling.num_workers.
    trial_workers: int | None = Field(
        None, ge=1, description="workers per trial; default scaling.num_workers"
    )
    collapse: CollapseRule = Field(default_factory=CollapseRule)
    # Off, a collapsed trial still gets its label in trials.csv but trains to its last epoch:
    # a plain search without early stopping (the baseline arm of bench/tune_bench.py).
    stop_collapsed: bool = Field(True, description="end a trial as soon as it shows collapse")
    probe: bool = Field(
        True,
        description="fit the linear probe of the first pretrained study's weights and report "
        "it as row zero of comparison.md, with every trial's gain over it",
    )
    studies: dict[str, Study] = Field(min_length=1)

    @model_validator(mode="after")
    def _start_within_budget(self) -> TuneSection:
        for name, study in self.studies.items():
            if len(study.start) > self.num_samples:
                raise ValueError(
                    f"studies.{name}.start has {len(study.start)} points, more than "
                    f"num_samples ({self.num_samples})"
                )
        return self


class TrackingConfig(_Strict):
    """MLflow tracking of training runs, trials and the exported winner (``carclf/tracking.py``)."""

    mlflow: bool = Field(False, description="log runs, trials and the bundle to MLflow")
    tracking_uri: str | None = Field(
        None,
        description="MLflow tracking URI; default sqlite:///<experiment dir>/mlflow.db (the "
        "run's parent directory, the search's output_dir, the pipeline's base)",
    )
    experiment: str | None = Field(None, description="MLflow experiment name; default the task")


class Config(_Strict):
    """A carclf run: every command reads the keys it needs from this one model."""

    output_dir: str
    seed: int = 42
    task: str = "body_type"
    data: DataConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    tune: TuneSection | None = None
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)


def parse_override(item: str) -> tuple[list[str], Any]:
    """Split ``a.b=value`` into its key path and a YAML-typed value (``3e-4`` is a float)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise UserInputError(f"--set {item!r}: expected key=value, e.g. train.lr=3e-4")
    value = yaml.safe_load(raw) if raw.strip() else ""
    # YAML 1.1 reads 3e-4 as a string; users mean a number.
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = float(value)
    return key.strip().split("."), value


def set_key(raw: dict[str, Any], key: str, value: Any) -> None:
    """Set the dotted ``key`` (``train.lr``) in a nested dict, creating sections on the way."""
    path = key.split(".")
    node = raw
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserInputError(f"{key}: {part!r} is not a section")
        node = child
    node[path[-1]] = value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``raw`` with each ``key.path=value`` override set."""
    out = yaml.safe_load(yaml.safe_dump(raw)) or {}
    for item in overrides:
        path, value = parse_override(item)
        set_key(out, ".".join(path), value)
    return out


def validate_config(raw: dict[str, Any], source: str = "config") -> Config:
    """Validate a plain dict; the error names the source and the first bad key."""
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        raise UserInputError(f"{source}: {key}: {err['msg']}") from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a YAML config, apply ``--set`` overrides and validate it."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserInputError(f"{path}: not valid YAML ({exc.__class__.__name__})") from None
    if not isinstance(raw, dict):
        raise UserInputError(f"{path}: the top level must be a mapping of keys")
    return validate_config(apply_overrides(raw, overrides or []), source=str(path))


def save_config(cfg: Config, directory: str | Path, name: str = "config.yaml") -> Path:
    """Write the resolved config as ``name`` (``config.yaml``) beside an output.

    An absent ``tune`` section is left out, so a saved train config reads as one.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    out = directory / name
    raw = cfg.model_dump(mode="json", exclude={"tune"} if cfg.tune is None else None)
    out.write_text(yaml.safe_dump(raw, sort_keys=False))
    return out
