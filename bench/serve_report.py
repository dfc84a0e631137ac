"""serve.md: the serving benchmark's results (``serve.json``) as Markdown."""

from __future__ import annotations

from carclf.tables import markdown_table, number_cell
from serve.launch import http_front


def markdown(r: dict) -> str:
    """serve.md: the headline measures, where the time goes, the framework grid."""
    cell = number_cell(1)
    grid = [
        {
            "threads": g["threads"],
            "batch": g["batch"],
            "onnxruntime img/s": g["onnx_images_per_s"],
            "eager img/s": g["eager_images_per_s"],
            "onnxruntime / eager": f"**{g['onnx_over_eager']:.2f}**",
        }
        for g in r["onnx_vs_eager_grid"]
    ]
    busy = ", ".join(f"{k}: {v}" for k, v in r["busy_threads"].items())
    app = r["app"]
    return "\n".join(
        [
            f"# Serving benchmark: {r['model']} ({r['arch']}, input {r['input_size']})",
            "",
            f"{len(r['rounds'])} rounds, each the same {r['requests']} JPEGs (640x480 to "
            "1024x768) in process, then over HTTP at each of "
            f"{', '.join(str(n) for n in r['clients'])} concurrent clients (the median round "
            "of each is shown), "
            f"{r['threads']} onnxruntime/torch thread(s), {r['cpus']} CPUs, batches of up to "
            f"{r['max_batch_size']} ({_wait(r['batch_wait_timeout_s'])}), "
            f"{app['ingress']['num_replicas']} ingress and {app['classifier']['num_replicas']} "
            "classifier replica(s); "
            f"the bundle's model.onnx is {r['precision']}; HTTP taken by "
            f"{http_front(r['front'], r.get('serve_env'))}.",
            "",
            *markdown_table(_measures(r), cell),
            "",
            "Where the time goes: each in-process stage alone (one image at a time), and the CPU "
            "time of every process of the benchmark's Ray during the HTTP load, per request "
            f"(threads doing a tenth or more of a replica's work: {busy}):",
            "",
            *markdown_table(_where(r), cell),
            "",
            "onnxruntime against PyTorch eager, forward passes only, alternating blocks:",
            "",
            *markdown_table(grid, cell),
            "",
            f"Measured {r.get('measured_at', '?')} with `{r.get('command', '?')}` "
            f"(load average {r.get('load_average', '?')} at the start).",
            "",
        ]
    )


def _measures(r: dict) -> list[dict[str, str]]:
    http, local, fw = r["http"], r["in_process"], r["onnx_vs_eager"]
    alone = r["in_process_alone"]
    pred, expl, sock = r["predict_latency"], r["explain_latency"], r["http_socket_client"]
    levels = [
        (
            f"HTTP predict, {lv['clients']} clients: throughput; p50 / p99",
            f"{lv['images_per_s']:.1f} img/s; {lv['p50_ms']:.1f} / {lv['p99_ms']:.1f} ms",
        )
        for lv in r["http_levels"]
    ]
    rows = [
        *levels,
        ("HTTP predict throughput (the best level)", f"{http['images_per_s']:.1f} img/s"),
        (
            "in-process decode+preprocess+onnxruntime (median round)",
            f"{local['images_per_s']:.1f} img/s",
        ),
        (
            f"**HTTP / in-process** (median of {len(r['rounds'])} rounds; each round)",
            f"**{r['http_over_in_process']:.2f}** "
            f"({', '.join(f'{x:.2f}' for x in r['http_over_in_process_rounds'])})",
        ),
        (
            "in-process before Ray started; HTTP (the best level) over it",
            f"{alone['images_per_s']:.1f} img/s; "
            f"{http['images_per_s'] / alone['images_per_s']:.2f}",
        ),
        (
            f"HTTP predict throughput, bare socket client, {http['clients']} clients (diagnostic)",
            f"{sock['images_per_s']:.1f} img/s ({sock['images_per_s'] / local['images_per_s']:.2f}"
            " of in-process)",
        ),
        ("onnxruntime forward", f"{fw['onnx_images_per_s']:.1f} img/s"),
        ("PyTorch eager forward", f"{fw['eager_images_per_s']:.1f} img/s"),
        ("**onnxruntime / eager**", f"**{fw['onnx_over_eager']:.2f}**"),
        ("predict p50 (one at a time)", f"{pred['p50_ms']:.1f} ms"),
        ("explain p50 (one at a time)", f"{expl['p50_ms']:.1f} ms"),
        ("**explain / predict (p50)**", f"**{r['explain_over_predict']:.2f}**"),
    ]
    return [{"measure": m, "value": v} for m, v in rows]


def _where(r: dict) -> list[dict[str, object]]:
    """In-process stages per image, then CPU per HTTP request by process."""
    rows: list[dict[str, object]] = [
        {"where": f"in process: {k.removesuffix('_ms')}", "ms per image": v}
        for k, v in r["stages"].items()
    ]
    rows += [
        {"where": f"HTTP, CPU of: {role}", "ms per image": ms}
        for role, ms in r["cpu_ms_per_request"].items()
    ]
    total = sum(r["cpu_ms_per_request"].values())
    rows.append({"where": "**HTTP, CPU of all processes**", "ms per image": total})
    # Over every round and level, as the CPU times are.
    levels = [lv for rnd in r["rounds"] for lv in rnd["http_levels"]]
    wall = 1000 * r["cpus"] * sum(1 / lv["images_per_s"] for lv in levels) / len(levels)
    rows.append({"where": f"HTTP, {r['cpus']} cores x wall time", "ms per image": wall})
    return rows


def _wait(seconds: float | None) -> str:
    return "the app's default wait" if seconds is None else f"waiting at most {seconds * 1000:g} ms"
