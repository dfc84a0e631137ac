"""The whole pipeline as a Ray job: audit → search → final training → export → evaluation.

    ray job submit --working-dir . -- python -m jobs.pipeline --config jobs/configs/toy-cluster.yaml

``--deploy`` then serves the bundle with Ray Serve on the same cluster (the app of ``serve/``).
Exit codes: 0 success, 2 bad input or configuration (one line naming the file, key or class),
1 anything else. The last line of standard output is the bundle (its URI for a URI output_dir).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from carclf.config import load_config
from carclf.errors import UserInputError
from carclf.pipeline import progress, run_job


def deploy(bundle: Path, name: str, port: int) -> str:
    """Run the Serve app for ``bundle`` on the cluster this job runs on; returns its URL.

    The app outlives the job (Serve's controller is detached). Its replicas load the bundle
    from ``bundle``, so on several machines that path must be on a shared filesystem.
    """
    from ray import serve

    from serve.app import AppArgs, build_app

    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(AppArgs(bundles=[str(bundle)])), name=name, route_prefix="/")
    return f"http://127.0.0.1:{port}"


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, validate, run the pipeline (and deploy); print the bundle last."""
    parser = argparse.ArgumentParser(prog="python -m jobs.pipeline", description=__doc__)
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--staging", type=Path, help="local staging dir for a URI output_dir")
    parser.add_argument("--deploy", action="store_true", help="serve the bundle with Ray Serve")
    parser.add_argument("--serve-port", type=int, default=8000)
    args = parser.parse_args(argv)
    try:
        result = run_job(load_config(args.config, args.set), staging=args.staging)
    except UserInputError as exc:
        print(f"jobs.pipeline: error: {exc}", file=sys.stderr, flush=True)
        return 2
    print(f"test accuracy: {result.pipeline.evaluation.metrics['summary']['acc']:.4f}")
    if args.deploy:
        bundle = result.pipeline.bundle
        url = deploy(bundle.path, bundle.info.name, args.serve_port)
        progress(f"serving {bundle.info.name} at {url}")
    print(result.bundle_uri, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
