"""The pipeline as a Ray job: audit (when ``data.root`` is set) → train → export → evaluate.

    ray job submit --working-dir . -- python -m jobs.pipeline --config jobs/configs/demo.yaml

Exit codes: 0 success, 2 bad input or configuration (one line naming the file, key or class),
1 anything else. The last line of standard output is the bundle directory.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from carclf.config import load_config
from carclf.errors import UserInputError
from carclf.pipeline import run_pipeline


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, validate, run the pipeline; print the bundle path last."""
    parser = argparse.ArgumentParser(prog="python -m jobs.pipeline", description=__doc__)
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    try:
        result = run_pipeline(load_config(args.config, args.set))
    except UserInputError as exc:
        print(f"jobs.pipeline: error: {exc}", file=sys.stderr)
        return 2
    print(f"test accuracy: {result.evaluation.metrics['summary']['acc']:.4f}")
    print(result.bundle.path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
