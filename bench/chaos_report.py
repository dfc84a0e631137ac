"""chaos.md: the chaos suite's results (``chaos.json``) as Markdown, a section per phase.

Results written by earlier versions of the suite (without rounds, probes at saturation or the
CPU split) still read: what they lack shows as ``-`` or is left out.
"""

from __future__ import annotations

from typing import Any

from carclf.tables import markdown_table, number_cell

CELL = number_cell(2, missing="-")


def markdown(r: dict[str, Any]) -> str:
    """chaos.md: the settings, then a table per phase."""
    lines = [f"# Chaos suite: {r['model']} ({r['arch']}, input {r['input_size']})", ""]
    lines += [
        f"Run {r['started']} to {r['finished']} ({r['seconds']:.0f} s), {r['cpus']} CPUs, "
        f"load average {r['load_average']} at the start; app: {r['app_summary']}.",
        "",
    ]
    sections = {"overload": _overload, "replica_kill": _replica_kill, "soak": _soak}
    for phase, section in sections.items():
        if phase in r:
            lines += section(r)
    lines += ["## Hostile inputs", "", *markdown_table(r["hostile"], CELL), ""]
    return "\n".join(lines)


def _overload(r: dict[str, Any]) -> list[str]:
    o = r["overload"]
    lines = ["## Overload", "", *markdown_table(overload_rows(o), CELL), ""]
    lines += [
        *_rounds_lines(o),
        "Probes, from a process of their own at nice 0, on new connections "
        f"every {r['flags']['probe_every_s']:g} s through saturation and each level: live "
        "and ready are the app's `/v2/health/live` and `/ready` (its health app, where it "
        "has one); front is `/-/healthz`, answered by the HTTP front itself (what KubeRay "
        "probes).",
        "",
        f"Cores used during each level, by part ({_where_client(r)}):",
        "",
        *markdown_table(cores_rows(o), CELL),
        "",
    ]
    if "niceness" in r:
        nice = "; ".join(f"{k} {', '.join(map(str, v))}" for k, v in r["niceness"].items())
        lines += [f"Niceness of each part: {nice}.", ""]
    return lines


def _replica_kill(r: dict[str, Any]) -> list[str]:
    k = r["replica_kill"]
    new = k["seconds_to_new_running_replica"]
    return [
        "## Classifier replica killed under load",
        "",
        f"{k['clients']} closed-loop clients; replica {k['killed']} killed with "
        f"`ray.kill`; a new replica running after "
        f"{'never (within the limit)' if new is None else f'{new:.1f} s'}.",
        "",
        *markdown_table(kill_rows(k), CELL),
        "",
    ]


def _soak(r: dict[str, Any]) -> list[str]:
    s = r["soak"]
    return [
        "## Soak",
        "",
        f"{s['seconds']:g} s after {s['warmup_s']:g} s of warm-up, {s['clients']} "
        f"clients; predict {_counts(s['predict']['statuses'])} (p50 / p99 "
        f"{_ms(s['predict'])} ms), explain {_counts(s['explain']['statuses'])} "
        f"(p50 / p99 {_ms(s['explain'])} ms).",
        "",
        *markdown_table(s["rss"], CELL),
        "",
    ]


def overload_rows(o: dict[str, Any]) -> list[dict[str, Any]]:
    """The overload table: one row per level, saturation first."""
    sat = o["saturation"]
    rows = [
        {
            "load": f"saturation ({sat['clients']} closed-loop clients)",
            "offered rps": "-",
            "sent": sum(sat["statuses"].values()),
            "statuses": _counts(sat["statuses"]),
            "refused": "-",
            "refuse p50 / p99 ms": "-",
            "accepted rps": sat["ok_rps"],
            "accepted / saturation": 1.0,
            "ok p50 / p99 ms": _ms(sat),
            **_probe_cells(sat),
        }
    ]
    for lv in o["levels"]:
        rows.append(
            {
                "load": _load(lv),
                "offered rps": _offered(lv),
                "sent": lv["sent"],
                "statuses": _counts(lv["statuses"]),
                "refused": lv["refused"],
                "refuse p50 / p99 ms": _ms(lv["refuse_latency"]),
                "accepted rps": lv["accepted_rps"],
                "accepted / saturation": lv["accepted_over_saturation"],
                "ok p50 / p99 ms": _ms(lv["ok_latency"]),
                **_probe_cells(lv),
            }
        )
    return rows


def _load(level: dict[str, Any]) -> str:
    if level["offered_rps"] is None:
        return f"{level['level']} ({level['clients']} closed-loop clients, a new connection each)"
    return f"{level['level']} open-loop"


def _offered(level: dict[str, Any]) -> str:
    if level["offered_rps"] is None:  # a closed loop offers what it gets
        return f"- (sent {level['sent_rps']:.0f})"
    return f"{level['offered_rps']:.0f} (sent {level['sent_rps']:.0f})"


def _probe_cells(level: dict[str, Any]) -> dict[str, str]:
    """The probes' columns of a row ("-" for results written before saturation had them)."""
    if "ready" not in level:
        return dict.fromkeys(
            ("live p50 / p99 ms", "ready p50 / p99 ms (statuses)", "front p50 / p99 ms"), "-"
        )
    ready = level["ready"]
    return {
        "live p50 / p99 ms": _ms(level["live"]),
        "ready p50 / p99 ms (statuses)": f"{_ms(ready)} ({_counts(ready['statuses'])})",
        "front p50 / p99 ms": _ms(level["front"]),
    }


def _rounds_lines(o: dict[str, Any]) -> list[str]:
    """Each round's saturation and accepted / saturation, under the table of the median one."""
    if "rounds" not in o:  # results written before the suite ran rounds
        return []
    each = "; ".join(
        f"{r['saturation_rps']:.1f} req/s, "
        + ", ".join(f"{k} {v:.2f}" for k, v in r.items() if k != "saturation_rps" and v)
        for r in o["rounds"]
    )
    return [
        f"{len(o['rounds'])} rounds, each its saturation then every level; the table shows "
        f"round {o['round_shown']}, the median by accepted / saturation at the highest level. "
        f"Each round's saturation and accepted / saturation: {each}.",
        "",
    ]


def cores_rows(o: dict[str, Any]) -> list[dict[str, Any]]:
    """Cores used at each overload level, by role (the load client shares the machine)."""
    levels = [("saturation", o["saturation"]), *((lv["level"], lv) for lv in o["levels"])]
    roles = list(dict.fromkeys(role for _, lv in levels for role in lv.get("cores", {})))
    return [
        {"load": name, **{role: lv.get("cores", {}).get(role, "-") for role in roles}}
        for name, lv in levels
    ]


def _where_client(r: dict[str, Any]) -> str:
    if "cpus_client" not in r:
        return "the load client runs on the same machine, on the same CPUs"
    return (
        f"the server pinned to CPUs {r['cpus_server']}, the load client and its prober to "
        f"{r['cpus_client']}: `--client-cpus`"
    )


def kill_rows(k: dict[str, Any]) -> list[dict[str, Any]]:
    """The replica-kill table: before, during (kill to new replica running), after."""
    return [
        {
            "window": name,
            "sent": k[name]["sent"],
            "failed": k[name]["failed"],
            "statuses": _counts(k[name]["statuses"]),
            "p50 / p99 ms": _ms(k[name]),
        }
        for name in ("before", "during", "after")
    ]


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in counts.items()) or "-"


def _ms(p: dict[str, float | None]) -> str:
    if p.get("p50_ms") is None:
        return "-"
    return f"{p['p50_ms']:.1f} / {p['p99_ms']:.1f}"
