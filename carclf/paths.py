"""Where an experiment's outputs go: its output directory and every path beside and inside it.

A config's ``output_dir`` is the run (or search experiment) directory itself; the other outputs
of the same experiment sit beside it, in its parent (the base). For ``output_dir: runs/x/train``::

    runs/x/manifest.parquet   data.root audited on the fly (carclf.runs.resolve_manifest)
    runs/x/tune/              the pipeline's search: an experiment directory
    runs/x/train/             the final run (output_dir)
    runs/x/bundle/            the exported bundle
    runs/x/eval/              the bundle's evaluation
    runs/x/baseline/          carclf baseline's default output
    runs/x/data/              carclf demo's toy data set
    runs/x/demo_overlay.png   carclf demo's Grad-CAM overlay

A search experiment directory (the ``output_dir`` of ``carclf tune``) holds::

    <study>/<trial>/          each trial's run directory (the format of carclf.runs)
    tune/<study>/             Tune's own experiment: its restore state and TensorBoard events
    best_config.yaml          the winner as a train config, whose output_dir is best_run/

The names inside a run directory are :mod:`carclf.runs`'; this module imports nothing heavy, so
that the entry layer and the pipeline can name paths before torch or Ray is imported.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from carclf.config import Config

MANIFEST_FILE = "manifest.parquet"
TUNE_DIR, BUNDLE_DIR, EVAL_DIR, BASELINE_DIR = "tune", "bundle", "eval", "baseline"
DEMO_DATA_DIR, DEMO_OVERLAY_FILE = "data", "demo_overlay.png"
# Inside a search experiment directory.
TUNER_DIR = "tune"  # Tune's experiments, one per study (its storage_path)
BEST_CONFIG_FILE, BEST_RUN_DIR = "best_config.yaml", "best_run"


@dataclass(frozen=True)
class ExperimentPaths:
    """Every path of one experiment, derived from its output directory.

    Attributes:
        output_dir: The run or search experiment directory, as given: :meth:`of` makes a
            config's absolute; a caller that has the directory already (a staged run) passes it.
    """

    output_dir: Path

    @classmethod
    def of(cls, cfg: Config) -> ExperimentPaths:
        """The paths of ``cfg``: its ``output_dir`` made absolute (symlinks resolved)."""
        return cls(Path(cfg.output_dir).resolve())

    # --- beside the output directory ------------------------------------------------------

    @property
    def base(self) -> Path:
        """The parent of the output directory, where the experiment's other outputs go."""
        return self.output_dir.parent

    @property
    def manifest(self) -> Path:
        """Where ``data.root`` is audited to, shared by the search, the run and what follows."""
        return self.base / MANIFEST_FILE

    @property
    def tune(self) -> Path:
        """The pipeline's search experiment directory."""
        return self.base / TUNE_DIR

    @property
    def bundle(self) -> Path:
        """The pipeline's exported bundle."""
        return self.base / BUNDLE_DIR

    @property
    def eval(self) -> Path:
        """The pipeline's evaluation of the bundle."""
        return self.base / EVAL_DIR

    @property
    def baseline(self) -> Path:
        """``carclf baseline``'s output when no ``--out`` is given."""
        return self.base / BASELINE_DIR

    @property
    def demo_data(self) -> Path:
        """The demo's toy data set, drawn once."""
        return self.base / DEMO_DATA_DIR

    @property
    def demo_overlay(self) -> Path:
        """The Grad-CAM overlay of the demo's test image, fetched over HTTP."""
        return self.base / DEMO_OVERLAY_FILE

    # --- inside a search experiment directory ---------------------------------------------

    def trials(self, study: str) -> Path:
        """The folder of ``study``'s trial run directories (``<study>/<trial name>``)."""
        return self.output_dir / study

    @property
    def tuner(self) -> Path:
        """Tune's storage path: one Tune experiment per study below it."""
        return self.output_dir / TUNER_DIR

    def tuner_study(self, study: str) -> Path:
        """Tune's own experiment of ``study``, which a rerun restores."""
        return self.tuner / study

    @property
    def best_config(self) -> Path:
        """The winning trial as a plain train config."""
        return self.output_dir / BEST_CONFIG_FILE

    @property
    def best_run(self) -> Path:
        """The run directory that :attr:`best_config` names."""
        return self.output_dir / BEST_RUN_DIR
