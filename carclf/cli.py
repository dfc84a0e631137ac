"""The ``carclf`` command: parses arguments, validates input, calls the library.

The entry layer (docs/ARCHITECTURE.md): the only carclf module that imports ``serve``, to start
the Serve app (``serve/launch.py``) for ``carclf serve``, ``carclf demo`` and
``carclf pipeline --deploy``, whose Ray starts with Serve's HTTP front before training does
(``serve.launch.start_ray``; ``train`` and ``tune`` never set one up). ``python -m
jobs.pipeline`` is this module's ``pipeline`` command.
Exit codes: 0 success, 2 bad input or configuration (one-line reason on stderr), 1 anything
else. Each command prints the path of what it wrote as the last line of standard output.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from carclf import __version__
from carclf.errors import UserInputError
from serve.front import FRONTS, front_in_use

if TYPE_CHECKING:  # the library is imported by each command, where it runs
    from carclf.pipeline import PipelineResult


def _ratios(text: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not three numbers: {text!r}") from None
    if len(parts) != 3 or min(parts) < 0:
        raise argparse.ArgumentTypeError(f"need train,val,test ratios, got {text!r}")
    return parts  # type: ignore[return-value]


# --- commands ------------------------------------------------------------------------------


def cmd_synth(args: argparse.Namespace) -> str:
    from carclf.data.synth import write_toy_dataset

    counts = (args.train, args.val, args.test)
    return str(write_toy_dataset(args.out, per_class=counts, seed=args.seed, size=args.size))


def cmd_audit(args: argparse.Namespace) -> str:
    from carclf.data.audit import run_audit, summary_lines

    run = run_audit(
        args.root,
        args.manifest,
        args.ratios,
        args.seed,
        force=args.force,
        dedupe_files=args.dedupe,
        group_near_duplicates=args.group_near_duplicates,
    )
    if run.reused:
        print(f"reusing the existing {run.manifest} (--force rebuilds it)", file=sys.stderr)
    for line in summary_lines(run.report) if run.report else []:
        print(line, file=sys.stderr)
    print(f"report: {run.report_paths[1]}", file=sys.stderr)
    return str(run.manifest)


def cmd_stanford(args: argparse.Namespace) -> str:
    from carclf.data.audit import summary_lines
    from carclf.data.stanford import import_stanford_cars

    done = import_stanford_cars(
        args.root,
        args.out,
        level=args.level,
        margin=args.margin,
        crop=not args.no_crop,
        val_ratio=args.val_ratio,
        seed=args.seed,
        force=args.force,
    )
    written = ", ".join(f"{k} {n}" for k, n in done.record["written"].items())
    print(f"cropped {written}; skipped {len(done.record['skipped'])}", file=sys.stderr)
    for line in summary_lines(done.audit.report) if done.audit.report else []:
        print(line, file=sys.stderr)
    print(f"report: {done.audit.report_paths[1]}", file=sys.stderr)
    return str(done.audit.manifest)


def cmd_train(args: argparse.Namespace) -> str:
    from carclf.config import load_config
    from carclf.train import run_training

    result = run_training(load_config(args.config, args.set))
    print(json.dumps({k: round(v, 4) for k, v in result.metrics.items()}), file=sys.stderr)
    return str(result.run_dir)


def cmd_tune(args: argparse.Namespace) -> str:
    from carclf.config import load_config
    from carclf.search.tune import run_tune

    out = run_tune(load_config(args.config, args.set), trust_state=args.trust_state)
    print((out / "comparison.md").read_text(), file=sys.stderr)
    return str(out)


def cmd_evaluate(args: argparse.Namespace) -> str:
    from carclf.evaluate import evaluate

    result = evaluate(
        args.source, args.manifest, args.split, args.out, gallery_size=args.gallery, tta=args.tta
    )
    print(json.dumps(result.metrics["summary"], indent=1), file=sys.stderr)
    return str(result.report)


def cmd_compare(args: argparse.Namespace) -> str:
    from carclf.evaluate import compare

    table = compare(args.sources, args.manifest, args.split, args.out)
    print(table.read_text(), file=sys.stderr)
    return str(table)


def cmd_baseline(args: argparse.Namespace) -> str:
    from carclf.baseline import run_baseline
    from carclf.config import load_config

    result = run_baseline(load_config(args.config, args.set), split=args.split, out=args.out)
    print(result.summary_line(), file=sys.stderr)
    return str(result.out_dir)


def cmd_export(args: argparse.Namespace) -> str:
    from carclf.export import export_run, export_settings

    settings = export_settings(args.run, args.set) if args.set else None
    bundle = export_run(args.run, args.out, name=args.name, settings=settings)
    return str(bundle.path)


def cmd_digest(args: argparse.Namespace) -> str:
    from carclf.bundle import bundle_digest, load_bundle, pinned_ref, split_pinned

    path, pin = split_pinned(args.bundle)
    digest = pin or bundle_digest(path)
    # Verified before it is printed: a digest of a bundle whose files do not match would pin
    # a bundle that no server accepts.
    load_bundle(path, expected_sha256=digest)
    what = "matches the pin" if pin else "pins bundle.json and every file it lists"
    print(f"sha256 {digest} {what}", file=sys.stderr)
    return pinned_ref(path, digest)


def cmd_predict(args: argparse.Namespace) -> str:
    from carclf.bundle import load_bundle
    from carclf.data.transforms import load_image
    from carclf.inference import OnnxClassifier

    clf = OnnxClassifier(load_bundle(args.bundle))
    probs = clf.probabilities([load_image(_existing(p)) for p in args.images])
    preds = clf.top_k(probs, args.top_k)
    for path, pred in zip(args.images, preds, strict=True):
        print(json.dumps({"image": path, **pred}))
    return str(args.bundle)


def cmd_explain(args: argparse.Namespace) -> str:
    from carclf.bundle import load_bundle
    from carclf.data.transforms import load_image
    from carclf.explain import Explainer, save_explanations

    explainer = Explainer.from_bundle(load_bundle(args.bundle), target_layer=args.target_layer)
    images = [load_image(_existing(p)) for p in args.images]
    exps = explainer.explain(images, method=args.method, target=args.target)
    names = [Path(p).stem for p in args.images]
    for path, exp in zip(save_explanations(exps, names, Path(args.out)), exps, strict=True):
        print(json.dumps({"overlay": str(path), "label": exp.label, "score": exp.score}))
    return str(args.out)


def cmd_serve(args: argparse.Namespace) -> str:
    from ray import serve

    from serve.launch import app_args, start_app

    settings = {
        "allowed_hosts": args.allowed_host,
        "max_images": args.max_images,
        "api_key_file": args.api_key_file,
        "allow_unauthenticated": args.insecure_no_api_key or None,
    }
    url = start_app(
        app_args(args.bundles, args.api_key, **settings),
        host=args.host,
        port=args.port,
        front=args.front,
    )
    # A stop from a supervisor (docker stop, systemd, timeout) shuts down as Ctrl-C does,
    # instead of leaving Serve's HAProxy and replicas behind. After Ray's start: ray.init
    # puts a handler of its own there.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    where = f"{url} through {front_in_use()}"
    print(f"serving {', '.join(args.bundles)} at {where} (Ctrl-C to stop)", file=sys.stderr)
    if os.environ.get("RAY_AUTH_MODE") == "token":
        print("Ray's own ports need its token (~/.ray/auth_token)", file=sys.stderr)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
    return url


def cmd_pipeline(args: argparse.Namespace) -> str:
    from carclf.config import load_config
    from carclf.pipeline import progress, run_pipeline

    cfg = load_config(args.config, args.set)
    if args.deploy:  # the Ray that trains is the one that serves: it starts with the front
        from serve.launch import app_args, check_port_free, start_app, start_ray

        check_port_free("127.0.0.1", args.serve_port)  # before training, not after it
        start_ray()
    result = run_pipeline(cfg, staging=args.staging, trust_state=args.trust_state)
    print(f"test accuracy: {result.evaluation.metrics['summary']['acc']:.4f}")
    if args.deploy:
        bundle = result.bundle
        # The app outlives this process (Serve's controller is detached). Its replicas load
        # the bundle from this path, so on several machines it must be on a shared filesystem.
        url = start_app(app_args([bundle.path]), port=args.serve_port, name=bundle.info.name)
        progress(f"serving {bundle.info.name} at {url} through {front_in_use()}")
    return result.bundle_uri


def cmd_demo(args: argparse.Namespace) -> str:
    import ray
    from ray import serve

    from carclf.config import load_config
    from carclf.data.manifest import read_manifest
    from carclf.paths import ExperimentPaths
    from carclf.pipeline import demo_config, progress, run_pipeline
    from serve.client import query, wait_ready
    from serve.launch import app_args, check_port_free, start_app, start_ray

    cfg = demo_config(load_config(args.config, args.set))
    paths = ExperimentPaths.of(cfg)
    check_port_free("127.0.0.1", args.port)  # before training, not after it
    try:
        start_ray()  # the Ray that trains serves next: it starts with Serve's HTTP front
        result = run_pipeline(cfg)
        progress(f"Ray Serve on http://127.0.0.1:{args.port} through {front_in_use()}")
        url = start_app(app_args([result.bundle.path]), port=args.port)
        wait_ready(url)
        progress("HTTP predict and explain for a test image")
        image = Path(read_manifest(result.trained.manifest).split("test")[0][0])
        answer = query(url, result.bundle.info.name, image, paths.demo_overlay)
    finally:
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
    _demo_summary(result, image, answer, paths.demo_overlay)
    return str(paths.base)


def _demo_summary(
    result: PipelineResult, image: Path, answer: dict[str, Any], overlay: Path
) -> None:
    """The demo's closing lines on standard output."""
    pred = answer["prediction"]
    print(f"test accuracy: {result.evaluation.metrics['summary']['acc']:.4f}")
    print(f"test image:    {image}")
    print(
        f"predicted:     {pred['label']} ({pred['score']:.3f}); "
        f"Grad-CAM explained {answer['explanation']['label']}"
    )
    print(f"report:        {result.evaluation.report}")
    print(f"bundle:        {result.bundle.path}")
    print(f"overlay:       {overlay}")


def _existing(path: str) -> str:
    if not Path(path).is_file():
        raise UserInputError(f"image not found: {path}")
    return path


# --- parser --------------------------------------------------------------------------------


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML config file")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.lr=3e-4 (repeatable)",
    )


def _add_data(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="data sets and manifests").add_subparsers(
        dest="data_command", required=True
    )
    p = data.add_parser("synth", help="write the embedded toy data set")
    p.add_argument("out")
    p.add_argument("--train", type=int, default=160, help="images per class in train")
    p.add_argument("--val", type=int, default=40)
    p.add_argument("--test", type=int, default=40)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_synth)
    p = data.add_parser("audit", help="scan, check and split an image tree into a manifest")
    p.add_argument("root")
    p.add_argument("--manifest", required=True)
    p.add_argument("--ratios", type=_ratios, default=(0.7, 0.15, 0.15))
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--force", action="store_true", help="rebuild an existing manifest")
    p.add_argument(
        "--dedupe", action="store_true", help="keep one copy of identical files (in train)"
    )
    p.add_argument(
        "--no-group-near-duplicates",
        dest="group_near_duplicates",
        action="store_false",
        help="flat root: let near-duplicates fall into different splits (only reported)",
    )
    p.set_defaults(func=cmd_audit)
    p = data.add_parser(
        "stanford-cars", help="import the Stanford Cars devkit as bbox crops, then audit them"
    )
    p.add_argument("root", help="folder with cars_train/, cars_test/ and the devkit files")
    p.add_argument("--out", required=True, help="new folder: images/, manifest.parquet, report")
    p.add_argument("--level", choices=["model", "make"], default="model")
    p.add_argument(
        "--margin", type=float, default=0.0, help="context around each box, fraction per side"
    )
    p.add_argument("--no-crop", action="store_true", help="keep whole images")
    p.add_argument("--val-ratio", type=float, default=0.1, help="of each class's train images")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--force", action="store_true", help="replace an earlier import in --out")
    p.set_defaults(func=cmd_stanford)


def _add_runs(sub: argparse._SubParsersAction) -> None:
    """The commands that take a config: demo, pipeline, train, tune."""
    p = sub.add_parser("demo", help="the whole pipeline on the embedded data set")
    p.add_argument("--config", default="jobs/configs/demo.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--port", type=int, default=8000)
    p.set_defaults(func=cmd_demo)
    add_pipeline_args(sub.add_parser("pipeline", help=PIPELINE_HELP))
    p = sub.add_parser("train", help="Ray Train fine-tuning")
    _config_args(p)
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("tune", help="Ray Tune + Optuna search with ASHA and collapse detection")
    _config_args(p)
    _trust_state_arg(p)
    p.set_defaults(func=cmd_tune)


def _trust_state_arg(p: argparse.ArgumentParser) -> None:
    """``--trust-state``: the user's confirmation to resume a search from Tune state that is
    not their own (it is pickled, so loading it can run code; carclf.ownership)."""
    p.add_argument(
        "--trust-state",
        action="store_true",
        help="resume a search whose Tune state is not owned by you or is writable by others",
    )


PIPELINE_HELP = "audit → search → final training → export → evaluation (→ --deploy)"


def add_pipeline_args(p: argparse.ArgumentParser) -> None:
    """The pipeline's arguments (``carclf pipeline`` and ``python -m jobs.pipeline``)."""
    _config_args(p)
    p.add_argument("--staging", type=Path, help="local staging dir for a URI output_dir")
    p.add_argument("--deploy", action="store_true", help="serve the bundle with Ray Serve")
    p.add_argument("--serve-port", type=int, default=8000)
    _trust_state_arg(p)
    p.set_defaults(func=cmd_pipeline)


def _add_models(sub: argparse._SubParsersAction) -> None:
    """The commands that take a run or a bundle (evaluate, compare, export), and baseline."""
    p = sub.add_parser("evaluate", help="metrics, plots and a report for a run or bundle")
    p.add_argument("source", help="run directory or bundle directory")
    p.add_argument("--manifest", required=True)
    p.add_argument("--split", default="test")
    p.add_argument("--out", required=True)
    p.add_argument("--gallery", type=int, default=12, help="Grad-CAM overlays per gallery")
    p.add_argument(
        "--tta",
        choices=("none", "flip"),
        help="a run's test-time augmentation (default: its export.tta); a bundle's is built in",
    )
    p.set_defaults(func=cmd_evaluate)
    p = sub.add_parser("compare", help="evaluate several runs or bundles; one comparison table")
    p.add_argument(
        "sources", nargs="+", help="run, bundle or baseline directories (baselines as written)"
    )
    p.add_argument("--manifest", required=True)
    p.add_argument("--split", default="test")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_compare)
    p = sub.add_parser(
        "baseline", help="linear probe on the config's frozen backbone: the figure to beat"
    )
    _config_args(p)
    p.add_argument("--split", default="test", help="split to score (C is chosen on val)")
    p.add_argument("--out", help="output directory (default: baseline/ beside output_dir)")
    p.set_defaults(func=cmd_baseline)
    p = sub.add_parser("export", help="ONNX + safetensors bundle with the parity check")
    p.add_argument("run")
    p.add_argument("--out", required=True)
    p.add_argument("--name", help="model name in the bundle (default: the config's task)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="export.KEY=VALUE",
        help="override the run's export settings, e.g. --set export.quantize=true or "
        "--set export.tta=flip",
    )
    p.set_defaults(func=cmd_export)


def _add_bundles(sub: argparse._SubParsersAction) -> None:
    """The commands that use a bundle: predict, explain, serve."""
    p = sub.add_parser("predict", help="top-k predictions from a bundle, without Serve")
    p.add_argument("bundle")
    p.add_argument("images", nargs="+")
    p.add_argument("--top-k", type=int, default=5)
    p.set_defaults(func=cmd_predict)
    p = sub.add_parser("explain", help="Grad-CAM overlays from a bundle, without Serve")
    p.add_argument("bundle")
    p.add_argument("images", nargs="+")
    p.add_argument("--out", required=True)
    p.add_argument("--method", default="gradcam")
    p.add_argument("--target", help="class name or index (default: the predicted class)")
    p.add_argument("--target-layer", help="module to hook (default: the bundle's)")
    p.set_defaults(func=cmd_explain)
    p = sub.add_parser("serve", help="the Serve app on a local Ray")
    p.add_argument("bundles", nargs="+")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--api-key",
        help="require this key in the x-api-key header (argv is visible to every user of the "
        "machine: prefer --api-key-file or $CARCLF_API_KEY, read when neither flag is given)",
    )
    p.add_argument("--api-key-file", metavar="FILE", help="a file holding the API key")
    p.add_argument(
        "--insecure-no-api-key",
        action="store_true",
        help="serve without a key on an address other than loopback (otherwise refused)",
    )
    p.add_argument(
        "--allowed-host",
        action="append",
        metavar="NAME",
        help="a Host header name to serve besides the bound address (repeatable; '*.example.com'"
        " for subdomains); replaces the default localhost, 127.0.0.1, [::1]",
    )
    p.add_argument("--max-images", type=int, help="images in one request; more is a 413")
    p.add_argument(
        "--front",
        choices=FRONTS,
        default="auto",
        help="what takes HTTP on a Ray carclf starts: HAProxy where there is a binary (auto, "
        "the default; Linux), HAProxy or an error, or Serve's Python proxy; a running "
        "cluster keeps the front it was started with",
    )
    p.set_defaults(func=cmd_serve)


def _add_bundle_tools(sub: argparse._SubParsersAction) -> None:
    """``carclf bundle …``: commands about a bundle itself (its digest, for pinning)."""
    tools = sub.add_parser("bundle", help="a bundle's digest, to pin it").add_subparsers(
        dest="bundle_command", required=True
    )
    p = tools.add_parser(
        "digest",
        help="verify a bundle and print PATH@sha256:<digest>, the pinned reference to serve",
    )
    p.add_argument("bundle", help="bundle directory, or PATH@sha256:<hex> to check a pin")
    p.set_defaults(func=cmd_digest)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every ``carclf`` command."""
    parser = argparse.ArgumentParser(prog="carclf", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"carclf {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_runs(sub)
    _add_data(sub)
    _add_models(sub)
    _add_bundles(sub)
    _add_bundle_tools(sub)
    return parser


def run(args: argparse.Namespace, prog: str = "carclf") -> int:
    """Run a parsed command: its output path last on stdout; exit code 0, 2 or 130."""
    try:
        out = args.func(args)
    except UserInputError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        return 130
    print(out, flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``carclf`` console script."""
    args = build_parser().parse_args(argv)
    if argv is None and args.command == "serve":
        with_ray_token_auth()
    return run(args)


def with_ray_token_auth() -> None:
    """Rerun this command with Ray's token authentication where it starts a Ray of its own.

    Ray's ports listen on every interface, and without a token anyone who reaches them runs
    code on this machine (the Jobs API). A Ray started with ``RAY_AUTH_MODE=token`` makes a
    token (``~/.ray/auth_token``) and refuses callers without it, but Ray reads the mode when
    it is imported, and whether this command joins a cluster is Ray's own rule, known only
    after importing it: so the process execs itself with the mode set (same pid, same
    arguments). A mode the user set, or a cluster it joins, stays as it is.
    """
    from carclf.runtime import cluster_to_join

    if "RAY_AUTH_MODE" in os.environ or cluster_to_join():
        return
    os.environ["RAY_AUTH_MODE"] = "token"
    os.execv(sys.executable, [sys.executable, "-m", "carclf", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
