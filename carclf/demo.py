"""The demo: the whole pipeline on the embedded toy data set, ending in real HTTP requests.

data synth → audit → (:mod:`carclf.pipeline`) Ray Train → parity-checked bundle → evaluation
→ Ray Serve → one predict and one explain request over HTTP → clean shutdown. The Serve
application is handed in by the caller (``build_app``), since ``serve/`` sits above carclf.
"""

from __future__ import annotations

import base64
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx

from carclf.config import load_config, save_config
from carclf.data.audit import write_audit
from carclf.data.manifest import read_manifest
from carclf.data.synth import write_toy_dataset
from carclf.pipeline import run_pipeline

STEPS = 5


def step(n: int, text: str) -> None:
    """One progress line on stderr."""
    print(f"[carclf demo {n}/{STEPS}] {text}", file=sys.stderr, flush=True)


def wait_ready(url: str, timeout_s: float = 180.0) -> None:
    """Poll ``/v2/health/ready`` until the app answers 200."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/v2/health/ready", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    raise RuntimeError(f"the Serve app at {url} did not become ready in {timeout_s:.0f} s")


def query(url: str, model: str, image: Path, out: Path) -> dict[str, Any]:
    """One predict and one explain request for ``image``; saves the returned overlay PNG."""
    data = image.read_bytes()
    headers = {"content-type": "image/jpeg"}
    pred = httpx.post(f"{url}/v1/models/{model}:predict", content=data, headers=headers, timeout=60)
    pred.raise_for_status()
    payload = {"instances": [{"image_b64": base64.b64encode(data).decode()}], "method": "gradcam"}
    expl = httpx.post(f"{url}/v1/models/{model}:explain", json=payload, timeout=120)
    expl.raise_for_status()
    explanation = expl.json()["explanations"][0]
    out.write_bytes(base64.b64decode(explanation["overlay_png_b64"]))
    return {"prediction": pred.json()["predictions"][0], "explanation": explanation}


def run_demo(
    config: str | Path,
    overrides: Sequence[str],
    build_app: Callable[[Sequence[str]], Any],
    port: int = 8000,
) -> Path:
    """Run the demo; returns the demo directory (the parent of the config's ``output_dir``)."""
    import ray
    from ray import serve

    cfg = load_config(config, list(overrides))
    base = Path(cfg.output_dir).resolve().parent
    data_root = base / "data"
    manifest = Path(cfg.data.manifest or base / "manifest.parquet")
    step(1, f"toy data set → {data_root}")
    if not (data_root / "train").is_dir():
        write_toy_dataset(data_root, seed=cfg.seed)
    step(2, f"audit → {manifest}")
    write_audit(data_root, manifest, seed=cfg.seed)
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"manifest": str(manifest)})})
    for old in (Path(cfg.output_dir), base / "bundle", base / "eval"):
        shutil.rmtree(old, ignore_errors=True)  # the demo always trains afresh
    save_config(cfg, base)
    try:
        step(3, "train → export → evaluate")
        result = run_pipeline(cfg)
        bundle, report = result.bundle, result.evaluation
        step(4, f"Ray Serve on http://127.0.0.1:{port}")
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app([str(bundle.path)]), name="carclf", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        wait_ready(url)
        step(5, "HTTP predict and explain for a test image")
        image = Path(read_manifest(manifest).split("test")[0][0])
        answer = query(url, bundle.info.name, image, base / "demo_overlay.png")
    finally:
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
    pred = answer["prediction"]
    print(f"test accuracy: {report.metrics['summary']['acc']:.4f}")
    print(f"test image:    {image}")
    print(
        f"predicted:     {pred['label']} ({pred['score']:.3f}); "
        f"Grad-CAM explained {answer['explanation']['label']}"
    )
    print(f"report:        {report.report}")
    print(f"bundle:        {bundle.path}")
    print(f"overlay:       {base / 'demo_overlay.png'}")
    return base
