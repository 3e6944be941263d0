"""``rnnserve bench``: a smoke run through the real CLI (tiny model and sizes), and the report's arithmetic.

No timing assertions: only that every phase produced its rows and every ratio is a finite positive number.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from rnnserve.bench import report

ROWS = ("compute", "transport", "sessions", "multiplexed", "chunked")


def _ratios(row: dict) -> dict[str, float]:
    return {k: v for k, v in row.items() if k.startswith("ratio") and not k.endswith("_to")} | (
        {"latency_ratio": row["latency_ratio"]} if "latency_ratio" in row else {}
    )


def test_bench_quick_smoke(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable,
        "-m",
        "rnnserve.cli",
        "bench",
        "--quick",
        "--sessions",
        "1,4",
        "--max-batch",
        "8",
        "--idle-sessions",
        "1000",
        "--json",
        str(out),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=170)
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    assert "targets:" in done.stdout and "[bench" in done.stderr  # the table on stdout, progress on stderr
    result = json.loads(out.read_text())
    assert result["errors"] == []
    assert [r["batch"] for r in result["compute"]] == [1, 2, 4, 8]
    assert sorted(r["sessions"] for r in result["sessions"]) == [1, 4]
    assert {(r["shape"], r["sessions"]) for r in result["transport"]} == {
        ("sessions", 1),
        ("sessions", 4),
        ("multiplexed", 4),
        ("chunked", 4),
    }
    assert [r["label"] for r in result["multiplexed"]] == ["N=4 in 1 msg", "N=4 columnar"]
    assert len(result["chunked"]) == 1
    assert result["idle"]["sessions"] == 1000
    for kind in ROWS:
        for row in result[kind]:
            for name, value in _ratios(row).items():
                assert isinstance(value, float) and math.isfinite(value) and value > 0, (kind, row["label"], name)
            if kind != "compute":
                assert row["steps"] > 0 and row["steps_per_s"] > 0
                # /proc counts CPU in 10 ms ticks: a quick phase may read 0, never less.
                assert row["server_cpu_us_per_step"] >= 0 and row["server_peak_rss_mib"] > 0
    loads = [r for kind in ROWS if kind != "compute" for r in result[kind]]
    assert any(r["server_cpu_us_per_step"] > 0 for r in loads), "server CPU was never measured"
    assert "latency_ratio" in next(r for r in result["sessions"] if r["sessions"] == 1)
    assert "mean_batch" in result["multiplexed"][0]
    idle = result["idle"]
    assert math.isfinite(idle["ratio"]) and idle["ratio"] > 0 and idle["bytes_per_session"] > 0
    assert {t["target"].split()[0] for t in result["targets"]} == {"4", "multiplexed", "1-session", "idle"}


def _load_row(shape: str, n: int, steps_per_s: float, p50: float = 1.0) -> dict:
    return {"phase": shape, "shape": shape, "label": f"N={n}", "sessions": n, "steps_per_s": steps_per_s, "p50_ms": p50}


def test_ratios_and_targets() -> None:
    compute = [
        {"phase": "compute", "label": f"batch {b}", "batch": b, "call_ms": 0.1 * b**0.5, "steps_per_s": 1000.0 * b}
        for b in (1, 2, 4, 256)
    ]
    result = {
        "compute": compute,
        "transport": [
            _load_row("sessions", 1, 2000, 0.4),
            _load_row("sessions", 256, 10000),
            _load_row("multiplexed", 256, 50000),
        ],
        "sessions": [_load_row("sessions", 1, 1000, 0.75), _load_row("sessions", 256, 9000)],
        "multiplexed": [_load_row("multiplexed", 256, 100000)],
        "chunked": [_load_row("chunked", 3, 1500)],
        "idle": {"bytes_per_session": 6000.0, "state_bytes": 4096},
    }
    report.add_ratios(result)
    one, many = result["sessions"]
    assert one["ratio"] == pytest.approx(0.5) and many["ratio"] == pytest.approx(0.9)
    assert one["latency_ratio"] == pytest.approx(0.75 / 0.5)
    assert result["transport"][0]["ratio"] == pytest.approx(2.0)  # transport vs compute at the same batch
    assert result["multiplexed"][0]["ratio"] == pytest.approx(100000 / 256000)
    assert result["multiplexed"][0]["ratio_transport"] == pytest.approx(2.0)
    assert result["chunked"][0]["ratio_to"] == "compute batch 2"  # largest measured batch <= 3
    assert result["idle"]["ratio"] == pytest.approx(6000 / 6144)
    got = {t["target"]: t["pass"] for t in report.targets(result)}
    assert got == {
        "256 sessions >= 0.8x transport": True,
        "multiplexed N=256 >= 0.6x compute batch 256": False,
        "1-session p50 <= transport p50 + batch-1 compute + 0.3 ms": True,
        "idle memory/session <= 1.2x raw state + 2 KiB": True,
    }
    text = report.markdown_table({**result, "peer": []})
    assert text.count("\n") == 2 + len(compute) + 3 + 2 + 1 + 1
