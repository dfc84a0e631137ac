"""What every serving benchmark sets up and counts: its inputs, its Ray, its processes.

* Inputs: photo-like JPEGs (:func:`photos`) and an untrained bundle exported through the real
  export path (:func:`untrained_bundle`): speed does not depend on the weights.
* The app's arguments from ``--app`` flags (:func:`app_args`), dotted keys reaching into
  :class:`serve.settings.AppArgs`' sections as ``--set`` reaches into a config's.
* Ray for a benchmark (:func:`start_ray`): Serve's mode and HTTP front as ``carclf serve``
  gets them (:mod:`serve.front`, :func:`serve.launch.start_ray`), without a dashboard, and
  retried where a busy machine misses Ray's start-up limit.
* The CPUs: the load client's and the server's (:func:`split_cpus`, :func:`pin`).
* Accounting by process role (:func:`process_roles`): CPU seconds, cores used, busy threads,
  niceness, and the RSS of Serve's processes. Only this process's descendants are counted:
  another Ray on the machine is not the benchmark's.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import psutil

from carclf.runtime import usable_cpus

if TYPE_CHECKING:
    from serve.front import FrontLimits

# --- inputs


def photos(count: int, seed: int = 0) -> list[bytes]:
    """JPEGs of a few photo-like sizes (smooth noise, so they compress like photos)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        w, h = [(640, 480), (800, 600), (1024, 768)][i % 3]
        small = rng.integers(0, 256, (h // 16, w // 16, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(small).resize((w, h), Image.BILINEAR).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def untrained_bundle(arch: str, img_size: int, out: Path) -> str:
    """Export an untrained ``arch`` through the real export path (parity check included)."""
    from carclf.config import validate_config
    from carclf.data.audit import write_audit
    from carclf.data.synth import write_toy_dataset
    from carclf.export import export_run
    from carclf.train import init_run

    root = write_toy_dataset(out / "toy", per_class=(4, 2, 2), size=img_size)
    manifest = write_audit(root, out / "manifest.parquet")
    cfg = validate_config(
        {
            "output_dir": str(out / "run"),
            "data": {"manifest": str(manifest)},
            "model": {"name": arch, "pretrained": False, "img_size": img_size},
            "train": {"batch_size": 4},
            "export": {"parity_images": 4},
        }
    )
    return str(export_run(init_run(cfg), out / "bundle", name=arch).path)


def load_average() -> str:
    """The machine's load averages (1, 5, 15 minutes), as the results record them."""
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


# --- the app's arguments


def app_args(bundles: list[str], defaults: dict[str, Any], pairs: list[str]) -> Any:
    """The benchmark's :class:`serve.settings.AppArgs`: its ``defaults``, then ``--app``'s
    ``pairs``, dotted keys into the sections as ``--set`` takes them
    (:func:`carclf.config.apply_overrides`; ``ingress.num_replicas=1``, a later pair winning).

    Raises:
        SystemExit: a field AppArgs does not have (an old flat key: the name that replaced
            it), or a value it refuses.
    """
    from pydantic import ValidationError

    from carclf.config import apply_overrides
    from carclf.errors import UserInputError
    from serve.settings import AppArgs

    try:
        return AppArgs(**apply_overrides({"bundles": bundles, **defaults}, pairs))
    except UserInputError as exc:
        raise SystemExit(f"--app: {exc}") from None
    except ValidationError as exc:
        errors = (f"{'.'.join(map(str, e['loc'])) or 'AppArgs'}: {e['msg']}" for e in exc.errors())
        raise SystemExit(f"--app: {'; '.join(errors)}") from None


# --- Ray


def start_ray(front: str = "auto", limits: FrontLimits | None = None, attempts: int = 3) -> str:
    """Ray for a benchmark, started as :func:`serve.launch.start_ray` starts it for
    ``carclf serve`` (Serve's mode, the HTTP ``front`` admitting by ``limits``) but without the
    dashboard, which would spend the server's CPUs on what no benchmark reads; the front in
    words. A running Ray (``RAY_ADDRESS``, or one ``ray start`` left) is joined, its front
    checked.

    Retried: on a busy machine the raylet can miss Ray's fixed 30 s start-up limit; a failed
    start's processes (this process's children) are ended before the next try.
    """
    from serve.launch import start_ray as start_serve_ray

    for attempt in range(1, attempts):
        try:
            return start_serve_ray(front, limits, dashboard=False)
        except Exception as exc:
            if "timed out during startup" not in str(exc):
                raise
            print(f"Ray did not start (attempt {attempt}): {exc}", file=sys.stderr)
            for proc in psutil.Process().children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    proc.kill()
            time.sleep(5)
    return start_serve_ray(front, limits, dashboard=False)


# --- CPUs


def default_client_cpus() -> int:
    """One CPU for the load client where the server would keep one or more, else none."""
    return 1 if usable_cpus() >= 2 else 0


def split_cpus(client_cpus: int) -> tuple[set[int], set[int]] | None:
    """This process's CPUs split in two: the server's, then the load client's last
    ``client_cpus`` of them; None where ``client_cpus`` is 0 (all shared).

    Raises:
        SystemExit: the split would leave the server no CPU.
    """
    cpus = sorted(os.sched_getaffinity(0))
    if client_cpus <= 0:
        return None
    if client_cpus >= len(cpus):
        raise SystemExit(f"--client-cpus {client_cpus} leaves the server none of {len(cpus)} CPUs")
    return set(cpus[:-client_cpus]), set(cpus[-client_cpus:])


def pin(cpus: set[int]) -> None:
    """Every thread of this process to ``cpus``; processes it starts from now on inherit them
    (Linux's affinity is per thread, and Ray's threads are already running)."""
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(ProcessLookupError):  # a thread that has just ended
            os.sched_setaffinity(int(tid), cpus)


# --- accounting by process role

# Roles of the processes of this benchmark's own Ray, by process title (ray::…) or binary.
ROLES = {
    "ProxyActor": "Serve proxy",
    "bin/haproxy": "HAProxy",
    ":Ingress": "ingress replicas",
    ":classifier-": "classifier replica",
    ":explainer-": "explainer replica",
    ":Health": "health replicas",
    "ServeController": "Serve controller",
    "raylet/raylet ": "raylet",
    "gcs/gcs_server ": "GCS",
}
# The Serve processes whose memory the soak follows.
SERVE_MARKERS = ("ServeReplica:", "ProxyActor", "ServeController")


def _descendants() -> Iterator[tuple[int, str]]:
    """PID and command line of each descendant of this process that is still there."""
    for proc in psutil.Process().children(recursive=True):
        try:
            yield proc.pid, " ".join(proc.cmdline())
        except psutil.Error:
            continue


def process_roles() -> dict[int, str]:
    """PID → role (``ROLES``) of this process and its descendants."""
    roles = {os.getpid(): "load client (this process)"}
    for pid, title in _descendants():
        roles[pid] = next((r for m, r in ROLES.items() if m in title), "other Ray processes")
    return roles


def serve_processes() -> dict[int, str]:
    """PID → role of this run's Serve processes (``SERVE_MARKERS``), named by their class."""
    roles = {}
    for pid, title in _descendants():
        for marker in SERVE_MARKERS:
            if marker in title:
                # "ray::Class.method" while a task runs: the role is the class
                roles[pid] = title.split("ray::", 1)[-1].strip().split(".")[0]
    return roles


def cpu_seconds(roles: dict[int, str]) -> dict[int, float]:
    """User + system CPU seconds so far of each PID (gone processes are left out)."""
    out = {}
    for pid in roles:
        try:
            t = psutil.Process(pid).cpu_times()
        except psutil.Error:
            continue
        out[pid] = t.user + t.system
    return out


def cpu_by_role(
    roles: dict[int, str], before: dict[int, float], after: dict[int, float], per: float = 1.0
) -> dict[str, float]:
    """CPU seconds by role between two :func:`cpu_seconds` readings, divided by ``per``
    (requests, or seconds for cores), most first. A process in ``after`` only started in
    between (HAProxy's reloads start a new one): all its CPU counts."""
    out: dict[str, float] = {}
    for pid, seconds in after.items():
        role = roles[pid]
        out[role] = out.get(role, 0.0) + (seconds - before.get(pid, 0.0)) / per
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def cores_used(roles: dict[int, str], before: dict[int, float], seconds: float) -> dict:
    """Cores each role used since ``before`` (a :func:`cpu_seconds` reading of ``roles``),
    processes started meanwhile included (Ray restarts HAProxy to reload its config)."""
    roles = {**roles, **process_roles()}
    after = cpu_seconds(roles)
    return {k: round(v, 3) for k, v in cpu_by_role(roles, before, after, seconds).items()}


def thread_seconds(roles: dict[int, str]) -> dict[tuple[int, int], float]:
    """CPU seconds so far of each thread of the classifier and ingress replicas."""
    out = {}
    for pid, role in roles.items():
        if role not in ("classifier replica", "ingress replicas"):
            continue
        try:
            out.update(
                {(pid, t.id): t.user_time + t.system_time for t in psutil.Process(pid).threads()}
            )
        except psutil.Error:
            continue
    return out


def busy_threads(
    roles: dict[int, str], before: dict[tuple[int, int], float], after: dict[tuple[int, int], float]
) -> dict[str, int]:
    """Threads per replica process that did a tenth or more of its CPU work during the load:
    the check that onnxruntime (and the ingress) ran on the threads they were given."""
    per_pid: dict[int, dict[int, float]] = {}
    for (pid, tid), seconds in after.items():
        per_pid.setdefault(pid, {})[tid] = seconds - before.get((pid, tid), 0.0)
    out = {}
    for pid, used in per_pid.items():
        total = sum(used.values()) or 1.0
        out[f"{roles[pid]} {pid}"] = sum(u >= 0.1 * total for u in used.values())
    return out


def niceness() -> dict[str, list[int]]:
    """Role → the niceness values of its processes (:func:`process_roles`)."""
    out: dict[str, set[int]] = {}
    for pid, role in process_roles().items():
        with contextlib.suppress(psutil.Error):
            out.setdefault(role, set()).add(psutil.Process(pid).nice())
    return {role: sorted(values) for role, values in sorted(out.items())}


def rss_mb(pids: list[int]) -> dict[int, float]:
    """Resident set size of each PID in MiB (NaN for one that is gone)."""
    out = {}
    for pid in pids:
        try:
            out[pid] = psutil.Process(pid).memory_info().rss / 2**20
        except psutil.Error:
            out[pid] = float("nan")
    return out


def rss_growth(roles: dict[int, str], samples: list[tuple[float, dict[int, float]]]) -> list:
    """Per process: RSS at the first and last sample (:func:`rss_mb` readings, each at its
    second), growth and its least-squares slope."""
    rows = []
    for pid, role in sorted(roles.items(), key=lambda kv: kv[1]):
        t = np.array([s[0] for s in samples])
        mb = np.array([s[1].get(pid, np.nan) for s in samples])
        keep = np.isfinite(mb)
        slope = np.polyfit(t[keep], mb[keep], 1)[0] * 60 if keep.sum() >= 2 else None
        rows.append(
            {
                "process": role,
                "pid": pid,
                "rss_start_mb": float(mb[keep][0]) if keep.any() else None,
                "rss_end_mb": float(mb[keep][-1]) if keep.any() else None,
                "growth_mb": float(mb[keep][-1] - mb[keep][0]) if keep.any() else None,
                "slope_mb_per_min": float(slope) if slope is not None else None,
            }
        )
    return rows
