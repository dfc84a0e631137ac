"""The stage sequence: data check → audit → search → final training → export → evaluation.

The one orchestration of the stages, used by ``carclf pipeline``, ``carclf demo`` and the
cluster job ``jobs.pipeline``; deploying the bundle with Ray Serve is those entry points' last
step (``carclf`` never imports ``serve``). :func:`run_pipeline` checks the data set first (a
missing one fails in seconds, before Ray starts), audits ``data.root``, runs the ``tune``
studies, trains the winner, exports and evaluates it.

Outputs sit beside the final run directory (:class:`carclf.paths.ExperimentPaths`): for
``output_dir: runs/x/train`` the manifest is ``runs/x/manifest.parquet``, the search
``runs/x/tune``, the bundle ``runs/x/bundle`` and the evaluation ``runs/x/eval``. A URI
``output_dir`` (``s3://…``) gets the same layout there: Ray Train writes its checkpoints straight
to it and the rest is written to a local staging directory and copied up (:mod:`carclf.storage`).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pyarrow import fs as pafs

from carclf.config import Config, load_config, save_config
from carclf.errors import UserInputError
from carclf.paths import BUNDLE_DIR, ExperimentPaths
from carclf.storage import Storage, open_storage
from carclf.tracking import log_bundle, with_store

# The stages import torch, timm and Ray (half a minute on a busy 2-core node): they are imported
# where they run, so that a job with a missing data set fails before that.
if TYPE_CHECKING:
    from carclf.bundle import Bundle
    from carclf.evaluate import EvalResult
    from carclf.train import TrainResult


@dataclass
class PipelineResult:
    """What the pipeline produced; ``bundle_uri`` is where the bundle now lives."""

    trained: TrainResult
    bundle: Bundle
    evaluation: EvalResult
    experiment: Path | None
    bundle_uri: str


def progress(text: str) -> None:
    """One progress line on stderr."""
    print(f"[carclf] {text}", file=sys.stderr, flush=True)


def check_data(cfg: Config) -> None:
    """Refuse a missing data set in a second, before anything heavy is imported or started."""
    if cfg.data.manifest:
        if not Path(cfg.data.manifest).is_file():
            raise UserInputError(f"data.manifest: no such file: {cfg.data.manifest}")
    elif not Path(cfg.data.root).is_dir():
        raise UserInputError(f"data.root: no such directory: {cfg.data.root}")


def with_data(cfg: Config, **data: object) -> Config:
    """A copy of ``cfg`` with keys of its ``data`` section replaced."""
    return cfg.model_copy(update={"data": cfg.data.model_copy(update=data)})


def winner_config(experiment: Path, output_dir: Path) -> Config:
    """The search's ``best_config.yaml``, retargeted to the final run directory."""
    best = ExperimentPaths(experiment).best_config
    if not best.is_file():
        raise RuntimeError(f"{experiment}: the search found no healthy trial (no {best.name})")
    return load_config(best, [f"output_dir={output_dir}"])


def _local_run_dir(storage: Storage, staging: Path | None) -> Path:
    """Where this machine writes the final run: in place, or in a staging directory."""
    if storage.is_local:
        return Path(storage.path)
    run_dir = Path(staging or tempfile.mkdtemp(prefix="carclf-staging-")) / storage.name
    progress(f"outputs → {storage.path} on {storage.filesystem.type_name}, staged in {run_dir}")
    return run_dir


def _audit(cfg: Config) -> Config:
    """``cfg`` reading the manifest of its data (``data.root`` audited beside the run)."""
    from carclf.runs import resolve_manifest

    if not cfg.data.manifest:
        progress(f"audit {cfg.data.root}")
    return with_data(cfg, manifest=str(resolve_manifest(cfg)))


def _search(
    cfg: Config, paths: ExperimentPaths, trust_state: bool = False
) -> tuple[Config, Path | None]:
    """Run the ``tune`` studies when the config has them; the winner's config for the run."""
    if cfg.tune is None:
        return cfg, None
    from carclf.search.tune import run_tune

    progress(f"search: studies {', '.join(cfg.tune.studies)} → {paths.tune}")
    experiment = run_tune(
        cfg.model_copy(update={"output_dir": str(paths.tune)}), trust_state=trust_state
    )
    winner = winner_config(experiment, paths.output_dir)
    progress(f"winner: {winner.model.name}, lr {winner.train.lr:.2e}")
    return winner, experiment


def run_pipeline(
    cfg: Config,
    staging: Path | None = None,
    filesystem: pafs.FileSystem | None = None,
    bundle_name: str | None = None,
    trust_state: bool = False,
) -> PipelineResult:
    """Data check → audit → search (when ``cfg.tune``) → final training → export → evaluation.

    Args:
        cfg: the config; ``output_dir`` (the final run directory) may be a URI.
        staging: local directory for what carclf writes when ``output_dir`` is not on the local
            filesystem (default: a new temporary directory).
        filesystem: a pyarrow filesystem that ``output_dir`` is a path inside (instead of a URI).
        bundle_name: the model's name in the bundle (default: the config's task).
        trust_state: resume a search from Tune state that is not the user's own
            (:func:`carclf.search.tune.check_restorable`).
    """
    check_data(cfg)
    from carclf.evaluate import evaluate
    from carclf.export import export_run
    from carclf.train import run_training

    storage = open_storage(cfg.output_dir, filesystem)
    run_dir = _local_run_dir(storage, staging)
    paths = ExperimentPaths(run_dir)  # as it is: a staging directory may be relative
    cfg = with_store(cfg.model_copy(update={"output_dir": str(run_dir)}), paths.base)
    cfg, experiment = _search(_audit(cfg), paths, trust_state)
    progress(
        f"Ray Train: {cfg.model.name}, {cfg.scaling.num_workers} workers, "
        f"{cfg.train.epochs} epochs → {run_dir}"
    )
    trained = run_training(cfg, storage=storage)
    progress("export: ONNX + safetensors, parity check against PyTorch")
    bundle = export_run(trained.run_dir, paths.bundle, name=bundle_name, settings=cfg.export)
    progress("evaluate the bundle on the test split")
    evaluation = evaluate(bundle.path, trained.manifest, "test", paths.eval)
    if trained.mlflow_run_id:
        log_bundle(cfg, trained.mlflow_run_id, bundle.path, paths.eval)
    if not storage.is_local:
        progress(f"copy the outputs up to {storage.parent().uri}")
        storage.parent().upload(paths.base)
    return PipelineResult(trained, bundle, evaluation, experiment, storage.sibling(BUNDLE_DIR).uri)


def demo_config(cfg: Config) -> Config:
    """The demo's config: the embedded toy data set drawn beside ``output_dir``, a fresh run.

    The toy set goes to ``<base>/data`` (drawn once), its audit to the run's manifest place;
    earlier training, bundle and evaluation outputs are removed, since the demo always trains
    afresh. The resolved config is saved in ``<base>``.

    Raises:
        UserInputError: one of those places holds something else than the demo's own output
            (or an empty directory); nothing is removed then.
    """
    from carclf.bundle import is_bundle
    from carclf.data.synth import write_toy_dataset

    paths = ExperimentPaths.of(cfg)
    # Only directories the demo wrote are removed; each is checked before anything is written.
    earlier = {
        Path(cfg.output_dir): lambda d: (d / "config.yaml").is_file(),  # a run writes it first
        paths.bundle: is_bundle,
        paths.eval: lambda d: (d / "metrics.json").is_file(),
    }
    for old, is_ours in earlier.items():
        _check_ours(old, is_ours)
    data_root = paths.demo_data
    if not (data_root / "train").is_dir():
        progress(f"toy data set → {data_root}")
        write_toy_dataset(data_root, seed=cfg.seed)
    for old in earlier:
        # Unresolved on purpose: rmtree refuses a symlinked directory, never empties its target.
        shutil.rmtree(old, ignore_errors=True)
    cfg = with_data(cfg, root=str(data_root), manifest=None)
    save_config(cfg, paths.base)
    return cfg


def _check_ours(path: Path, is_ours: Callable[[Path], bool]) -> None:
    """Refuse to remove ``path`` unless absent, empty, or an earlier output of the demo."""
    if not path.exists() or (path.is_dir() and (not any(path.iterdir()) or is_ours(path))):
        return
    raise UserInputError(
        f"{path} exists and is not an earlier carclf output; not removing it "
        "(the demo starts afresh: give another output_dir)"
    )
