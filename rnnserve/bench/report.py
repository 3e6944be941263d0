"""From runs to figures: medians with min and max, the saturated-load rule, ratios, targets and the tables.

Everything here is arithmetic on plain dicts (no processes), so tests check it directly.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

Row = dict[str, Any]
Run = dict[str, Any]

SATURATED = 0.9  # load CPU time / wall / load CPUs at or above this: the load, not the server, set the pace
LATENCY_SLACK_MS = 0.1  # a lone session's p50 may exceed the floor's p50 + batch-1 compute by this much
IDLE_FACTOR, IDLE_SLACK = 1.2, 2048  # idle memory per session <= 1.2 x raw state + 2 KiB
SPREAD = ("steps_per_s", "call_ms", "bytes_per_session")  # figures shown with their min and max
LOAD_PHASES = ("kserve", "native", "multiplexed", "chunked", "scale")
PASS, FAIL, INVALID, NOT_MEASURED = "PASS", "FAIL", "INVALID", "NOT MEASURED"


# ---- runs -> a row ----------------------------------------------------------------------------------------
def load_fraction(cpu_s: float, wall_s: float, cpus: int) -> float:
    """How busy the load kept its CPUs: its CPU seconds over the wall time they offered."""
    return cpu_s / (wall_s * cpus) if wall_s > 0 and cpus > 0 else math.nan


def saturated(run: Run) -> bool:
    return run.get("load_cpu", 0.0) >= SATURATED


def summarize(meta: Row, runs: list[Run]) -> Row:
    """One row from its runs: every numeric figure the median of the runs that have it, ``SPREAD`` figures with
    ``_min``/``_max``; ``error`` when a run failed; ``invalid`` when a run's load CPUs were saturated."""
    row: Row = {**meta, "runs": runs}
    keys = dict.fromkeys(k for run in runs for k, v in run.items() if isinstance(v, int | float) and k != "error")
    for key in keys:
        values = [run[key] for run in runs if key in run and _finite(run[key])]
        if not values:
            row[key] = math.nan
            continue
        row[key] = statistics.median(values)
        if key in SPREAD:
            row[f"{key}_min"], row[f"{key}_max"] = min(values), max(values)
    errors = [run["error"] for run in runs if "error" in run]
    if errors:
        row["error"] = errors[0] if len(runs) == 1 else f"{errors[0]} ({len(errors)} of {len(runs)} runs)"
    busy = [run["load_cpu"] for run in runs if _finite(run.get("load_cpu"))]
    if busy:
        row["load_cpu"] = max(busy)
        row["saturated"] = sum(saturated(run) for run in runs)
        row["invalid"] = row["saturated"] > 0
    return row


def usable(row: Row | None) -> bool:
    """A row whose figure is the server's: measured, no failed run, load never saturated."""
    return row is not None and _finite(row.get("steps_per_s")) and "error" not in row and not row.get("invalid")


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def _ratio(value: float, base: float) -> float:
    return value / base if _finite(base) and base > 0 and _finite(value) else math.nan


# ---- ratios -----------------------------------------------------------------------------------------------
def _compute_at(compute: list[Row], batch: int) -> Row | None:
    """The compute row for ``batch`` (or the largest measured batch below it)."""
    fits = [r for r in compute if r["batch"] <= batch]
    return fits[-1] if fits else (compute[0] if compute else None)


def load_rows(result: dict[str, Any]) -> list[Row]:
    return [row for phase in LOAD_PHASES for row in result.get(phase) or []]


def add_ratios(result: dict[str, Any]) -> None:
    """Give rows their ratios (in place): compute to batch 1; every server to the floor (and rnnserve to the
    peer) under the same load and size, multiplexed and chunked rows to the compute ceiling at their batch;
    idle memory to the raw state plus 2 KiB. A ratio needs both rows usable."""
    compute: list[Row] = result.get("compute") or []
    for row in compute:
        row["ratio"] = _ratio(row["steps_per_s"], compute[0]["steps_per_s"])
    by_key = {(r["phase"], r["system"], r["label"]): r for r in load_rows(result) if r["phase"] != "scale"}
    for (phase, system, label), row in by_key.items():
        if system == "floor" or not usable(row):
            continue
        floor = by_key.get((phase, "floor", label))
        if usable(floor):
            row["vs_floor"] = _ratio(row["steps_per_s"], floor["steps_per_s"])  # type: ignore[index]
        peer = by_key.get((phase, "triton", label))
        if system == "rnnserve" and usable(peer):
            row["vs_peer"] = _ratio(row["steps_per_s"], peer["steps_per_s"])  # type: ignore[index]
        if phase in ("multiplexed", "chunked") and compute:
            ceiling = _compute_at(compute, row["sessions"])
            if ceiling is not None:
                row["vs_compute"] = _ratio(row["steps_per_s"], ceiling["steps_per_s"])
                row["vs_compute_to"] = ceiling["label"]
    idle = result.get("idle")
    if idle and _finite(idle.get("bytes_per_session")):
        idle["ratio"] = _ratio(idle["bytes_per_session"], idle["state_bytes"] + IDLE_SLACK)
    add_scale_ratios(result)


def add_scale_ratios(result: dict[str, Any]) -> None:
    """The multi-process rows' ratios (in place): N workers behind the gateway against 1 worker behind it (the
    scale-out gain); 1 worker behind the gateway against one plain server on the same redis store (the gateway
    hop) and against the native row of the same size on the memory store (gateway and store together); the
    plain redis row against that row too (the store's cost)."""
    rows = [r for r in result.get("scale") or [] if usable(r)]
    direct = next((r for r in rows if not r["gateway"]), None)
    one = next((r for r in rows if r["gateway"] and r["processes"] == 1), None)
    if direct is None and one is None:
        return
    n = (direct or one)["sessions"]  # type: ignore[index]
    plain = next(
        (r for r in result.get("native") or [] if r["system"] == "rnnserve" and r["sessions"] == n and usable(r)),
        None,
    )
    plain_to = f"native rnnserve N={n} (no gateway, memory store)"
    if direct is not None and plain is not None:
        direct["ratio"] = _ratio(direct["steps_per_s"], plain["steps_per_s"])
        direct["ratio_to"] = f"{plain_to}: the store's cost"
    if one is not None:
        if direct is not None:
            one["ratio"] = _ratio(one["steps_per_s"], direct["steps_per_s"])
            one["ratio_to"] = f"{direct['label']}: the gateway hop"
        if plain is not None:
            one["ratio_direct"] = _ratio(one["steps_per_s"], plain["steps_per_s"])
            one["ratio_direct_to"] = f"{plain_to}: gateway + store"
    for row in rows:
        if row["gateway"] and row["processes"] > 1 and one is not None:
            row["ratio"] = _ratio(row["steps_per_s"], one["steps_per_s"])
            row["ratio_to"] = f"{one['label']} (scale-out gain)"


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
        f"scale: {row['processes']} workers on {len(row['cpus'])} CPUs behind the gateway do "
        f"{_fmt(row['ratio'], '.2f')}x the steps/s of 1 worker on 1 CPU "
        f"({_fmt(row['steps_per_s'], ',.0f')} vs {_fmt(one['steps_per_s'], ',.0f')})"
    )
    if "ratio" in one:
        line += f"; 1 worker behind the gateway: {_fmt(one['ratio'], '.2f')}x of the same server without it"
    if "ratio_direct" in one:
        line += f", {_fmt(one['ratio_direct'], '.2f')}x of {one['ratio_direct_to'].split(':')[0]}"
    return [line]


# ---- targets ----------------------------------------------------------------------------------------------
def _target(name: str, status: str, detail: str) -> Row:
    return {"target": name, "status": status, "pass": status == PASS, "detail": detail}


def _unusable(rows: list[Row | None]) -> str | None:
    """Why a target cannot be judged on ``rows`` (they exist): a failed run or a saturated load."""
    for row in rows:
        assert row is not None
        name = f"{row.get('system', '')} {row['label']}".strip()
        if "error" in row:
            return f"{name}: {row['error']}"
        if row.get("invalid"):
            return f"{name}: load CPUs saturated in {row['saturated']} of {len(row['runs'])} runs"
    return None


def targets(result: dict[str, Any]) -> list[Row]:
    """The project's targets, each PASS, FAIL, INVALID (its rows' load saturated or a run failed) or NOT
    MEASURED (this run lacks its rows). Only meaningful for the default bench model at full sizes: the caller
    decides whether they apply."""
    compute = {r["batch"]: r for r in result.get("compute") or []}
    kserve = {(r["system"], r["sessions"]): r for r in result.get("kserve") or []}
    one_cpu = len(result["config"]["server_cpus"]) == 1
    peer_skipped = (result.get("skipped") or {}).get("peer")
    out = []

    def judge(name: str, rows: list[Row | None], missing: str, check: Any) -> None:
        if any(r is None for r in rows):
            out.append(_target(name, NOT_MEASURED, missing))
            return
        why = _unusable(rows)
        if why is not None:
            out.append(_target(name, INVALID, why))
            return
        ok, detail = check(*rows)
        out.append(_target(name, PASS if ok else FAIL, detail))

    def versus_peer(n: int, factor: float) -> None:
        ours, peer = kserve.get(("rnnserve", n)), kserve.get(("triton", n))
        if peer is None and ours is not None:
            why = f"not measured ({peer_skipped})" if peer_skipped else "not measured (no --peer triton)"
            out.append(_target(f"{n} session(s) >= {factor:g}x Triton's steps/s", NOT_MEASURED, why))
            return
        judge(
            f"{n} session(s) >= {factor:g}x Triton's steps/s",
            [ours, peer],
            f"no kserve N={n} rows",
            lambda a, b: (
                a["steps_per_s"] >= factor * b["steps_per_s"],
                f"{_ratio(a['steps_per_s'], b['steps_per_s']):.2f}x "
                f"({a['steps_per_s']:,.0f} vs {b['steps_per_s']:,.0f} steps/s)",
            ),
        )

    versus_peer(1, 3.0)

    def latency(ours: Row, floor: Row, batch1: Row) -> tuple[bool, str]:
        budget = floor["p50_ms"] + batch1["call_ms"] + LATENCY_SLACK_MS
        return ours["p50_ms"] <= budget, (
            f"{ours['p50_ms']:.3f} vs {budget:.3f} ms (floor {floor['p50_ms']:.3f} + compute "
            f"{batch1['call_ms']:.3f} + {LATENCY_SLACK_MS})"
        )

    judge(
        f"1 session p50 <= floor p50 + batch-1 compute + {LATENCY_SLACK_MS * 1000:.0f} us",
        [kserve.get(("rnnserve", 1)), kserve.get(("floor", 1)), compute.get(1)],
        "no kserve N=1 rows or compute batch 1",
        latency,
    )
    versus_peer(16, 2.0)
    for n in (64, 256):
        name = f"{n} sessions >= 0.75x the floor's steps/s on one server CPU"
        if not one_cpu:
            out.append(_target(name, NOT_MEASURED, "the server ran on more than one CPU (--server-cpus)"))
            continue
        judge(
            name,
            [kserve.get(("rnnserve", n)), kserve.get(("floor", n))],
            f"no kserve N={n} rows",
            lambda a, b: (
                a["steps_per_s"] >= 0.75 * b["steps_per_s"],
                f"{_ratio(a['steps_per_s'], b['steps_per_s']):.2f}x "
                f"({a['steps_per_s']:,.0f} vs {b['steps_per_s']:,.0f} steps/s)",
            ),
        )
    name = "multiplexed StepBatch of 256 sessions >= 0.6x compute batch 256 on one server CPU"
    mux = next((r for r in result.get("multiplexed") or [] if r["system"] == "rnnserve" and r["sessions"] == 256), None)
    if not one_cpu:
        out.append(_target(name, NOT_MEASURED, "the server ran on more than one CPU (--server-cpus)"))
    else:
        judge(
            name,
            [mux, compute.get(256)],
            "no 256-session multiplexed row or compute batch 256",
            lambda a, c: (
                a["steps_per_s"] >= 0.6 * c["steps_per_s"],
                f"{_ratio(a['steps_per_s'], c['steps_per_s']):.2f}x "
                f"({a['steps_per_s']:,.0f} vs {c['steps_per_s']:,.0f} steps/s)",
            ),
        )
    idle = result.get("idle")
    idle_name = "idle memory per session <= 1.2x raw state + 2 KiB at 100,000 sessions"
    if idle is not None and idle.get("sessions") != 100_000:
        out.append(_target(idle_name, NOT_MEASURED, f"measured at {idle.get('sessions'):,} sessions"))
    else:

        def memory(row: Row) -> tuple[bool, str]:
            limit = IDLE_FACTOR * row["state_bytes"] + IDLE_SLACK
            return row["bytes_per_session"] <= limit, f"{row['bytes_per_session']:,.0f} vs {limit:,.0f} bytes"

        judge(idle_name, [idle], "no idle row", memory)
    return out


def missed(found: list[Row]) -> list[Row]:
    """Targets that make ``--check-targets`` fail: FAIL, and INVALID (not shown to be met)."""
    return [t for t in found if t["status"] in (FAIL, INVALID)]


# ---- the tables -------------------------------------------------------------------------------------------
COMPUTE_COLUMNS = ("compute", "call ms", "steps/s", "min-max", "x batch 1")
LOAD_COLUMNS = (
    "phase",
    "system",
    "load",
    "config",
    "steps/s",
    "min-max",
    "p50 ms",
    "p99 ms",
    "srv CPU us/step",
    "load CPU us/step",
    "batch",
    "load CPUs busy",
    "x floor",
    "x peer",
    "note",
)


def _fmt(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, spec)


def _spread(row: Row, key: str, spec: str) -> str:
    if f"{key}_min" not in row:
        return "-"
    return f"{_fmt(row[f'{key}_min'], spec)}-{_fmt(row[f'{key}_max'], spec)}"


def compute_rows(result: dict[str, Any]) -> list[list[str]]:
    return [
        [
            row["label"],
            _fmt(row["call_ms"], ".3f"),
            _fmt(row["steps_per_s"], ",.0f"),
            _spread(row, "steps_per_s", ",.0f"),
            _fmt(row.get("ratio"), ".2f"),
        ]
        for row in result.get("compute") or []
    ]


def _note(row: Row) -> str:
    notes = []
    if "error" in row:
        notes.append(f"ERROR: {row['error'].splitlines()[0][:200]}")
    if row.get("invalid"):
        notes.append(f"INVALID: load CPUs saturated in {row['saturated']} of {len(row['runs'])} runs")
    if "vs_compute" in row:
        notes.append(f"{row['vs_compute']:.2f}x compute {row['vs_compute_to']}")
    if row["phase"] == "scale":
        from rnnserve.bench.procs import cpu_list

        shared = " (shared with the load)" if row.get("shares_load_cpus") else ""
        notes.append(f"server CPUs {cpu_list(row['cpus'])}{shared}")
        if "ratio" in row:
            notes.append(f"{row['ratio']:.2f}x {row['ratio_to']}")
        if "ratio_direct" in row:
            notes.append(f"{row['ratio_direct']:.2f}x {row['ratio_direct_to']}")
        cpu = [f"{role} {_fmt(row.get(f'{role}_cpu_us_per_step'), ',.0f')}" for role in ("gateway", "store")]
        notes.append(f"CPU us/step: {', '.join(c for c in cpu if not c.endswith(' -'))}")
    return "; ".join(notes)


def table_rows(result: dict[str, Any]) -> list[list[str]]:
    lines = []
    for row in load_rows(result):
        bad = "error" in row or row.get("invalid")
        steps = _fmt(row.get("steps_per_s"), ",.0f")
        lines.append(
            [
                row["phase"],
                row["system"],
                row["load"],
                row["label"],
                f"({steps})" if bad else steps,  # not the server's figure
                _spread(row, "steps_per_s", ",.0f"),
                _fmt(row.get("p50_ms"), ".3f"),
                _fmt(row.get("p99_ms"), ".3f"),
                _fmt(row.get("server_cpu_us_per_step"), ",.0f"),
                _fmt(row.get("client_cpu_us_per_step"), ",.0f"),
                _fmt(row.get("mean_batch"), ".1f"),
                _fmt(100 * row["load_cpu"], ".0f") + "%" if _finite(row.get("load_cpu")) else "-",
                _fmt(row.get("vs_floor"), ".2f"),
                _fmt(row.get("vs_peer"), ".2f"),
                _note(row),
            ]
        )
    return lines


def idle_line(result: dict[str, Any]) -> str | None:
    idle = result.get("idle")
    if not idle:
        return None
    if "error" in idle and not _finite(idle.get("bytes_per_session")):
        return f"idle: ERROR {idle['error']}"
    return (
        f"idle: {idle['sessions']:,} open sessions: {_fmt(idle.get('bytes_per_session'), ',.0f')} bytes/session "
        f"({_spread(idle, 'bytes_per_session', ',.0f')}) against {idle['state_bytes']:,} bytes of state "
        f"({_fmt(idle.get('ratio'), '.2f')}x state + 2 KiB); server CPU "
        f"{_fmt(idle.get('server_cpu_us_per_open'), ',.0f')} us/open, "
        f"RSS {_fmt(idle.get('server_rss_mib'), ',.0f')} MiB"
    )


def header(result: dict[str, Any]) -> list[str]:
    from rnnserve.bench.procs import cpu_list

    m, machine, cfg = result["model"], result["machine"], result["config"]
    return [
        f"model {m['name']}:{m['version']} ({m['format']}), {m['state_bytes']:,} state bytes/session",
        f"machine: {machine['cpus']} CPUs, {machine['cpu_model']}",
        f"pinned: servers on CPU {cpu_list(cfg['server_cpus'])}, loads on CPU {cpu_list(cfg['load_cpus'])} "
        f"(perf_analyzer; rnnserve load: {cfg['client_procs']} process(es)); a row whose load CPUs were "
        f">= {SATURATED:.0%} busy is INVALID",
        f"each figure: the median of {cfg['repeat']} run(s) (min-max shown), systems alternating; perf_analyzer "
        f"--streaming --sequence-length 100 -p {cfg['window_ms']} -r {cfg['pa_max_trials']} -s {cfg['pa_stability']} "
        f"--max-threads {len(cfg['load_cpus'])}",
    ]


def _target_lines(result: dict[str, Any], markdown: bool = False) -> list[str]:
    if result.get("targets_note"):
        return [f"targets not evaluated: {result['targets_note']}"]
    status = "**{}**" if markdown else "{} "
    return [f"{status.format(t['status'])} {t['target']}: {t['detail']}" for t in result.get("targets") or []]


def _footer(result: dict[str, Any]) -> list[str]:
    lines = []
    for name, why in (result.get("skipped") or {}).items():
        if name != "scale":  # scale_summary says it
            lines.append(f"{name}: skipped: {why}")
    lines += scale_summary(result)
    lines += [f"ERROR {err}" for err in result.get("errors", [])]
    return lines


def _markdown(columns: tuple[str, ...], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return out + ["| " + " | ".join(cells) + " |" for cells in rows]


def markdown_report(result: dict[str, Any]) -> str:
    lines = [*(f"{line}  " for line in header(result)), ""]
    if result.get("compute"):
        lines += [*_markdown(COMPUTE_COLUMNS, compute_rows(result)), ""]
    rows = table_rows(result)
    if rows:
        lines += [*_markdown(LOAD_COLUMNS, rows), ""]
    idle = idle_line(result)
    lines += [f"- {idle}"] if idle else []
    lines += [f"- {line}" for line in _target_lines(result, markdown=True)]
    lines += [f"- {line}" for line in _footer(result)]
    return "\n".join(lines)


def _text_table(columns: tuple[str, ...], rows: list[list[str]], left: int) -> list[str]:
    """Columns padded to width; the first ``left`` left-aligned, the last unpadded."""
    cells = [list(columns), *rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns) - 1)]
    out = []
    for i, row in enumerate(cells):
        padded = zip(row[:-1], widths, strict=True)
        head = "  ".join(c.ljust(w) if j < left else c.rjust(w) for j, (c, w) in enumerate(padded))
        out.append(f"{head}  {row[-1]}".rstrip())
        if i == 0:
            out.append("-" * len(out[0]))
    return out


def text_report(result: dict[str, Any]) -> str:
    lines = [*header(result), ""]
    if result.get("compute"):
        lines += [*_text_table(COMPUTE_COLUMNS, compute_rows(result), 1), ""]
    rows = table_rows(result)
    if rows:
        lines += [*_text_table(LOAD_COLUMNS, rows, 4), ""]
    idle = idle_line(result)
    lines += [idle, ""] if idle else []
    lines.append("targets:")
    lines += [f"  {line}" for line in _target_lines(result)]
    footer = _footer(result)
    if footer:
        lines += ["", *footer]
    return "\n".join(lines)
