"""Ratios to the ceilings, the Triton-style targets, and the printed table."""

from __future__ import annotations

import math
from typing import Any

Row = dict[str, Any]
LATENCY_SLACK_MS = 0.3  # 1-session p50 may exceed transport p50 + batch-1 compute by this much
IDLE_FACTOR, IDLE_SLACK = 1.2, 2048  # idle memory per session <= 1.2 x raw state + 2 KiB
PHASES = ("compute", "transport", "sessions", "multiplexed", "chunked", "idle", "scale", "peer")


def _ratio(value: float, ceiling: float) -> float:
    return value / ceiling if ceiling and math.isfinite(ceiling) and ceiling > 0 else math.nan


def _compute_at(compute: list[Row], batch: int) -> Row:
    """The compute row for ``batch`` (or the largest measured batch below it)."""
    fits = [r for r in compute if r["batch"] <= batch]
    return fits[-1] if fits else compute[0]


def add_ratios(result: dict[str, Any]) -> None:
    """Give every row its ratio to the relevant ceiling (in place)."""
    compute: list[Row] = result["compute"]
    for row in compute:
        row["ratio"] = _ratio(row["steps_per_s"], compute[0]["steps_per_s"])
        row["ratio_to"] = f"compute {compute[0]['label']} (batching gain)"
    # Echo rows mirror rnnserve's message shapes and labels (list vs columnar multiplexing share a size).
    transport = {(r["shape"], r["label"]): r for r in result["transport"]}
    for row in result["transport"]:
        if row["shape"] == "floor":  # the minimal server: against the bare echo, same sessions and client
            echo = transport.get(("sessions", f"N={row['sessions']}"))
            row["ratio"] = _ratio(row["steps_per_s"], echo["steps_per_s"] if echo else math.nan)
            row["ratio_to"] = f"transport N={row['sessions']}"
            continue
        ceiling = _compute_at(compute, row["sessions"])
        row["ratio"] = _ratio(row["steps_per_s"], ceiling["steps_per_s"])
        row["ratio_to"] = f"compute {ceiling['label']}"
    for row in result["sessions"]:
        echo = transport.get(("sessions", row["label"]))
        row["ratio"] = _ratio(row["steps_per_s"], echo["steps_per_s"] if echo else math.nan)
        row["ratio_to"] = f"transport {row['label']}"
        if row["sessions"] == 1 and echo is not None:
            budget = echo["p50_ms"] + _compute_at(compute, 1)["call_ms"]
            row["latency_ratio"] = _ratio(row["p50_ms"], budget)
            row["latency_ratio_to"] = "transport p50 + compute batch 1 (p50 latency)"
    for kind in ("multiplexed", "chunked"):
        for row in result[kind]:
            ceiling = _compute_at(compute, row["sessions"])
            row["ratio"] = _ratio(row["steps_per_s"], ceiling["steps_per_s"])
            row["ratio_to"] = f"compute {ceiling['label']}"
            echo = transport.get((kind, row["label"]))
            if echo is not None:
                row["ratio_transport"] = _ratio(row["steps_per_s"], echo["steps_per_s"])
    triton = {
        r["sessions"]: r for r in result.get("peer", []) if r["label"].startswith("triton") and "steps_per_s" in r
    }
    floor = {r["sessions"]: r for r in result.get("peer", []) if r["label"].startswith("echo") and "steps_per_s" in r}
    for row in result.get("peer", []):
        if "steps_per_s" not in row:
            continue
        peer = triton.get(row["sessions"]) if row["label"].startswith(("rnnserve", "echo")) else None
        echo = floor.get(row["sessions"]) if row["label"].startswith("rnnserve") else None
        if echo is not None:  # what Python gRPC alone carries with this client: the ceiling for this row
            row["ratio_echo"] = _ratio(row["steps_per_s"], echo["steps_per_s"])
        if peer is not None:
            # The same client against both servers: throughput and server CPU per step against Triton's.
            row["ratio"] = _ratio(row["steps_per_s"], peer["steps_per_s"])
            row["ratio_to"] = f"{peer['label']} (same client)"
            if row.get("server_cpu_us_per_step") and peer.get("server_cpu_us_per_step"):
                row["cpu_ratio"] = _ratio(row["server_cpu_us_per_step"], peer["server_cpu_us_per_step"])
            continue
        echo = transport.get(("sessions", f"N={row['sessions']}"))
        row["ratio"] = _ratio(row["steps_per_s"], echo["steps_per_s"] if echo else math.nan)
        row["ratio_to"] = f"transport N={row['sessions']}"
    idle = result.get("idle")
    if idle:
        idle["ratio"] = _ratio(idle["bytes_per_session"], idle["state_bytes"] + IDLE_SLACK)
        idle["ratio_to"] = "raw state bytes + 2 KiB"


def add_scale_ratios(result: dict[str, Any]) -> None:
    """The multi-process rows' ratios (in place). Their ceilings are measured by the scale phase itself: N workers
    behind the gateway against 1 worker behind it (the scale-out gain); 1 worker behind the gateway against one
    plain server on the same redis store (the gateway hop) and, when this run measured it, against the plain
    memory-store row with the same session count (gateway and store together); the plain redis row against
    that row too (the store's cost)."""
    rows = result.get("scale") or []
    direct = next((r for r in rows if not r["gateway"]), None)
    one = next((r for r in rows if r["gateway"] and r["processes"] == 1), None)
    if direct is None and one is None:
        return
    n = (direct or one)["sessions"]  # type: ignore[index]
    plain = next((r for r in result.get("sessions", []) if r["sessions"] == n and "steps_per_s" in r), None)
    plain_to = f"rnnserve sessions N={n} (no gateway, memory store)"
    if direct is not None and plain is not None:
        direct["ratio"] = _ratio(direct["steps_per_s"], plain["steps_per_s"])
        direct["ratio_to"] = f"{plain_to}: the store's cost"
    if one is not None:
        if direct is not None:
            one["ratio"] = _ratio(one["steps_per_s"], direct["steps_per_s"])
            one["ratio_to"] = f"scale {direct['label']}: the gateway hop"
        if plain is not None:
            one["ratio_direct"] = _ratio(one["steps_per_s"], plain["steps_per_s"])
            one["ratio_direct_to"] = f"{plain_to}: gateway + store"
    for row in rows:
        if row["gateway"] and row["processes"] > 1 and one is not None:
            row["ratio"] = _ratio(row["steps_per_s"], one["steps_per_s"])
            row["ratio_to"] = f"scale {one['label']} (scale-out gain)"


def scale_summary(result: dict[str, Any]) -> list[str]:
    """One line on the multi-process rows (or why they were skipped)."""
    skipped = (result.get("skipped") or {}).get("scale")
    if skipped:
        return [f"scale: skipped: {skipped}"]
    rows = result.get("scale") or []
    one = next((r for r in rows if r["gateway"] and r["processes"] == 1), None)
    many = [r for r in rows if r["gateway"] and r["processes"] > 1 and "ratio" in r]
    if one is None or not many:
        return []
    row = many[-1]
    line = (
        f"scale: {row['processes']} workers behind the gateway do {_fmt(row['ratio'], '.2f')}x the steps/s of 1 "
        f"({_fmt(row['steps_per_s'], ',.0f')} vs {_fmt(one['steps_per_s'], ',.0f')})"
    )
    if "ratio" in one:
        line += f"; 1 worker behind the gateway: {_fmt(one['ratio'], '.2f')}x of the same server without it"
    if "ratio_direct" in one:
        line += f", {_fmt(one['ratio_direct'], '.2f')}x of {one['ratio_direct_to'].split(':')[0]}"
    return [line]


def targets(result: dict[str, Any]) -> list[Row]:
    """The Triton-style targets, each PASS or FAIL (skipped when its rows were not measured)."""
    compute, out = result["compute"], []
    by_n = {r["sessions"]: r for r in result["sessions"]}
    echo_by_n = {r["sessions"]: r for r in result["transport"] if r["shape"] == "sessions"}
    if by_n:
        n = 256 if 256 in by_n else max(by_n)
        row, echo = by_n[n], echo_by_n.get(n)
        if echo:
            need = 0.8 * echo["steps_per_s"]
            floor = next((r for r in result["transport"] if r["shape"] == "floor" and r["sessions"] == n), None)
            # How much of the ceiling a server doing only the unavoidable per-step work keeps here.
            least = f"; a minimal Python server (no model): {floor['ratio']:.2f}x" if floor and "ratio" in floor else ""
            out.append(
                _target(
                    f"{n} sessions >= 0.8x transport",
                    row["steps_per_s"] >= need,
                    f"{row['steps_per_s']:,.0f} vs {need:,.0f} steps/s{least}",
                )
            )
    for row in result["multiplexed"]:
        need = 0.6 * _compute_at(compute, row["sessions"])["steps_per_s"]
        out.append(
            _target(
                f"multiplexed {row['label']} >= 0.6x compute batch {row['sessions']}",
                row["steps_per_s"] >= need,
                f"{row['steps_per_s']:,.0f} vs {need:,.0f} steps/s",
            )
        )
    if 1 in by_n and 1 in echo_by_n:
        budget = echo_by_n[1]["p50_ms"] + _compute_at(compute, 1)["call_ms"] + LATENCY_SLACK_MS
        p50 = by_n[1]["p50_ms"]
        out.append(
            _target(
                f"1-session p50 <= transport p50 + batch-1 compute + {LATENCY_SLACK_MS} ms",
                p50 <= budget,
                f"{p50:.3f} vs {budget:.3f} ms",
            )
        )
    floors = {r["sessions"]: r for r in result.get("peer", []) if r["label"].startswith("echo") and "ratio" in r}
    for row in result.get("peer", []):
        if row["label"].startswith("rnnserve") and "same client" in row.get("ratio_to", ""):
            echo = floors.get(row["sessions"])
            # The bare echo's own ratios say whether the target is within Python gRPC's reach at all.
            floor = f"; a bare Python gRPC echo: {echo['ratio']:.2f}x" if echo else ""
            out.append(
                _target(
                    f"{row['label']} >= 1.5x Triton's steps/s",
                    row["ratio"] >= 1.5,
                    f"{row['ratio']:.2f}x ({row['steps_per_s']:,.0f} steps/s, {row['ratio_to']}){floor}",
                )
            )
            if "cpu_ratio" in row:
                echo_cpu = echo.get("cpu_ratio") if echo else None
                cpu_floor = f"; a bare Python gRPC echo: {echo_cpu:.2f}x" if echo_cpu is not None else ""
                out.append(
                    _target(
                        f"{row['label']} <= 0.5x Triton's server CPU per step",
                        row["cpu_ratio"] <= 0.5,
                        f"{row['cpu_ratio']:.2f}x ({row['server_cpu_us_per_step']:,.0f} us/step){cpu_floor}",
                    )
                )
    idle = result.get("idle")
    if idle:
        limit = IDLE_FACTOR * idle["state_bytes"] + IDLE_SLACK
        out.append(
            _target(
                "idle memory/session <= 1.2x raw state + 2 KiB",
                idle["bytes_per_session"] <= limit,
                f"{idle['bytes_per_session']:,.0f} vs {limit:,.0f} bytes",
            )
        )
    return out


def _target(name: str, ok: bool, detail: str) -> Row:
    return {"target": name, "pass": bool(ok), "detail": detail}


# ---- the table ------------------------------------------------------------------------------------------------
COLUMNS = ("phase", "config", "steps/s", "p50 ms", "p99 ms", "srv CPU us/step", "srv peak MiB", "batch", "ratio", "vs")


def _fmt(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, spec)


def table_rows(result: dict[str, Any]) -> list[list[str]]:
    lines = []
    for row in result["compute"]:
        lines.append(
            [
                "compute",
                row["label"],
                _fmt(row["steps_per_s"], ",.0f"),
                _fmt(row["call_ms"], ".3f"),
                "",
                "",
                "",
                str(row["batch"]),
                _fmt(row["ratio"], ".2f"),
                row["ratio_to"],
            ]
        )
    for kind in ("transport", "sessions", "multiplexed", "chunked", "scale", "peer"):
        for row in result.get(kind, []):
            if "steps_per_s" not in row:
                lines.append([kind, row["label"], "-", "", "", "", "", "", "-", row.get("error", "")])
                continue
            vs = row.get("ratio_to", "")
            if "latency_ratio" in row:
                vs += f"; p50 {row['latency_ratio']:.2f}x of {row['latency_ratio_to']}"
            if "ratio_transport" in row:
                vs += f"; {row['ratio_transport']:.2f}x transport"
            if "cpu_ratio" in row:
                vs += f"; server CPU/step {row['cpu_ratio']:.2f}x"
            if "ratio_direct" in row:
                vs += f"; {row['ratio_direct']:.2f}x {row['ratio_direct_to']}"
            if kind == "scale":
                cpu = [f"{role} {_fmt(row.get(f'{role}_cpu_us_per_step'), ',.0f')}" for role in ("gateway", "store")]
                vs += f" [CPU us/step: {', '.join(c for c in cpu if not c.endswith(' -'))}]"
            lines.append(
                [
                    "rnnserve " + kind if kind in ("sessions", "multiplexed", "chunked") else kind,
                    row["label"],
                    _fmt(row["steps_per_s"], ",.0f"),
                    _fmt(row.get("p50_ms"), ".3f"),
                    _fmt(row.get("p99_ms"), ".3f"),
                    _fmt(row.get("server_cpu_us_per_step"), ",.0f"),
                    _fmt(row.get("server_peak_rss_mib"), ",.0f"),
                    _fmt(row.get("mean_batch"), ".1f"),
                    _fmt(row.get("ratio"), ".2f"),
                    vs,
                ]
            )
    idle = result.get("idle")
    if idle:
        lines.append(
            [
                "idle",
                idle.get("label", "idle"),
                "",
                "",
                "",
                _fmt(idle.get("server_cpu_us_per_open"), ",.0f") + "/open",
                _fmt(idle.get("server_peak_rss_mib"), ",.0f"),
                "",
                _fmt(idle["ratio"], ".2f"),
                f"{idle['bytes_per_session']:,.0f} B/session vs {idle['state_bytes']:,} B state + 2 KiB",
            ]
        )
    return lines


def markdown_table(result: dict[str, Any]) -> str:
    rows = table_rows(result)
    out = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    out += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(out)


def markdown_report(result: dict[str, Any]) -> str:
    lines = [markdown_table(result), ""]
    lines += [f"- **{'PASS' if t['pass'] else 'FAIL'}** {t['target']}: {t['detail']}" for t in result["targets"]]
    lines += [f"- {line}" for line in scale_summary(result)]
    lines += [f"- ERROR {err}" for err in result.get("errors", [])]
    return "\n".join(lines)


def text_report(result: dict[str, Any]) -> str:
    rows = [list(COLUMNS), *table_rows(result)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS) - 1)]
    lines = []
    for i, cells in enumerate(rows):
        head = "  ".join(
            c.ljust(w) if j < 2 else c.rjust(w) for j, (c, w) in enumerate(zip(cells, widths, strict=False))
        )
        lines.append(f"{head}  {cells[-1]}")
        if i == 0:
            lines.append("-" * len(lines[0]))
    m = result["model"]
    lines.insert(0, f"model {m['name']}:{m['version']} ({m['format']}), {m['state_bytes']:,} state bytes/session")
    machine, procs = result["machine"], result["config"]["client_procs"]
    lines.insert(1, f"machine: {machine['cpus']} CPUs, {machine['cpu_model']}; {procs} load generator process(es)")
    lines.append("")
    lines.append("targets:")
    for t in result["targets"]:
        lines.append(f"  {'PASS' if t['pass'] else 'FAIL'}  {t['target']}: {t['detail']}")
    summary = scale_summary(result)
    if summary:
        lines.append("")
        lines += summary
    for err in result.get("errors", []):
        lines.append(f"  ERROR {err}")
    return "\n".join(lines)
