"""The whole pipeline as a Ray job: audit → search → final training → export → evaluation.

    ray job submit --working-dir . -- python -m jobs.pipeline --config jobs/configs/toy-cluster.yaml

The same command as ``carclf pipeline`` (:mod:`carclf.pipeline`), for a working directory that
has no console script. ``--deploy`` then serves the bundle with Ray Serve on the same cluster.
Exit codes: 0 success, 2 bad input or configuration (one line naming the file, key or class),
1 anything else. The last line of standard output is the bundle (its URI for a URI output_dir).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from carclf.cli import add_pipeline_args, run


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, validate, run the pipeline (and deploy); print the bundle last."""
    parser = argparse.ArgumentParser(prog="python -m jobs.pipeline", description=__doc__)
    add_pipeline_args(parser)
    return run(parser.parse_args(argv), prog="jobs.pipeline")


if __name__ == "__main__":
    sys.exit(main())
