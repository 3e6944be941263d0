"""``rnnserve bench``: a smoke run through the real CLI (tiny model and sizes), and the report's arithmetic.

No timing assertions: only that every phase produced its rows and every ratio is a finite positive number.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rnnserve.bench import report

ROWS = ("compute", "transport", "sessions", "multiplexed", "chunked", "scale")
# The scale phase (N server processes behind the gateway versus one) needs both; CI installs them.
HAVE_SCALE = shutil.which("redis-server") is not None and (
    shutil.which("nginx") is not None or os.access("/usr/sbin/nginx", os.X_OK)
)


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
        ("floor", 4),  # the minimal server, at the largest sessions row (256 when measured)
    }
    (floor,) = [r for r in result["transport"] if r["shape"] == "floor"]
    assert floor["label"] == "N=4 minimal server" and floor["ratio_to"] == "transport N=4"
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
    if HAVE_SCALE:
        _check_scale_rows(result, workers=2, sessions=4)
        assert "scale: 2 workers behind the gateway do " in done.stdout
    else:
        assert result["scale"] == [] and "apt-get install redis-server nginx" in result["skipped"]["scale"]


def _check_scale_rows(result: dict, *, workers: int, sessions: int) -> None:
    """One plain server on redis, 1 worker behind the gateway, N workers behind it; every ratio measured."""
    assert "scale" not in result["skipped"]
    direct, one, many = result["scale"]
    assert [(r["processes"], r["gateway"]) for r in (direct, one, many)] == [(1, False), (1, True), (workers, True)]
    assert {r["sessions"] for r in result["scale"]} == {sessions}
    assert many["server_procs"] == workers and one["server_procs"] == 1
    assert set(_ratios(direct)) == {"ratio"} and direct["ratio_to"].startswith(f"rnnserve sessions N={sessions}")
    assert set(_ratios(one)) == {"ratio", "ratio_direct"} and one["ratio_to"].startswith("scale ")
    assert set(_ratios(many)) == {"ratio"} and one["label"] in many["ratio_to"]
    for row in (one, many):
        assert row["gateway_cpu_us_per_step"] >= 0 and row["store_cpu_us_per_step"] >= 0
        assert row["mean_batch"] >= 1
    # The workers' peak RSS is summed: N Python processes hold more than one.
    assert many["server_peak_rss_mib"] > one["server_peak_rss_mib"]


def test_bench_scale_skipped_without_redis(tmp_path: Path) -> None:
    """Without redis-server the scale phase says what to install and is recorded as skipped; the bench passes."""
    out = tmp_path / "bench.json"
    empty = tmp_path / "bin"
    empty.mkdir()
    cmd = [sys.executable, "-m", "rnnserve.cli", "bench", "--quick", "--phases", "scale", "--json", str(out)]
    env = {**os.environ, "PATH": str(empty)}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    assert "phase scale SKIPPED: redis-server" in done.stderr and "apt-get install redis-server nginx" in done.stderr
    assert "scale: skipped: redis-server" in done.stdout
    result = json.loads(out.read_text())
    assert result["errors"] == [] and result["scale"] == [] and result["sessions"] == []
    assert "apt-get install redis-server nginx" in result["skipped"]["scale"]


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
            {**_load_row("floor", 256, 7000), "label": "N=256 minimal server"},
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
    assert result["transport"][3]["ratio"] == pytest.approx(0.7)  # the minimal server vs the echo
    assert result["multiplexed"][0]["ratio"] == pytest.approx(100000 / 256000)
    assert result["multiplexed"][0]["ratio_transport"] == pytest.approx(2.0)
    assert result["chunked"][0]["ratio_to"] == "compute batch 2"  # largest measured batch <= 3
    assert result["idle"]["ratio"] == pytest.approx(6000 / 6144)
    found = report.targets(result)
    assert "a minimal Python server (no model): 0.70x" in found[0]["detail"]
    got = {t["target"]: t["pass"] for t in found}
    assert got == {
        "256 sessions >= 0.8x transport": True,
        "multiplexed N=256 >= 0.6x compute batch 256": False,
        "1-session p50 <= transport p50 + batch-1 compute + 0.3 ms": True,
        "idle memory/session <= 1.2x raw state + 2 KiB": True,
    }
    text = report.markdown_table({**result, "peer": []})
    assert text.count("\n") == 2 + len(compute) + 4 + 2 + 1 + 1


def _scale_row(label: str, processes: int, gateway: bool, steps_per_s: float) -> dict:
    return {
        "phase": "scale",
        "shape": "sessions",
        "label": label,
        "sessions": 256,
        "processes": processes,
        "gateway": gateway,
        "steps_per_s": steps_per_s,
    }


def test_scale_ratios() -> None:
    def fresh() -> list[dict]:
        return [
            _scale_row("N=256, 1 process, no gateway", 1, False, 3000),
            _scale_row("N=256, 1 worker + gateway", 1, True, 2400),
            _scale_row("N=256, 4 workers + gateway", 4, True, 6000),
        ]

    rows = fresh()
    result = {"sessions": [_load_row("sessions", 64, 3000), _load_row("sessions", 256, 4000)], "scale": rows}
    report.add_scale_ratios(result)
    direct, one, many = rows
    assert direct["ratio"] == pytest.approx(0.75)  # the store's cost: vs the plain N=256 row
    assert one["ratio"] == pytest.approx(0.8)  # the gateway hop: vs the same server on the same store
    assert one["ratio_direct"] == pytest.approx(0.6)  # gateway and store together
    assert many["ratio"] == pytest.approx(2.5) and "scale-out gain" in many["ratio_to"]
    (line,) = report.scale_summary(result)
    assert line.startswith("scale: 4 workers behind the gateway do 2.50x the steps/s of 1 (6,000 vs 2,400)")
    assert "0.60x of rnnserve sessions N=256" in line
    # Without the plain row of the same size (not measured in this run) there is no ratio to it.
    alone = {"sessions": [], "scale": fresh()}
    report.add_scale_ratios(alone)
    assert "ratio" not in alone["scale"][0] and "ratio_direct" not in alone["scale"][1]
    assert alone["scale"][2]["ratio"] == pytest.approx(2.5)
    assert report.scale_summary({"skipped": {"scale": "nginx not installed"}}) == [
        "scale: skipped: nginx not installed"
    ]


def test_peer_rows_compare_the_same_client() -> None:
    """--peer triton: rnnserve driven by the peer's own load generator is compared with Triton row by row
    (throughput and server CPU per step), and the peer targets are judged on those ratios."""

    def peer(label: str, sessions: int, steps_per_s: float, cpu: float) -> dict:
        return {"phase": "peer", "label": f"{label} N={sessions}", "sessions": sessions, "steps_per_s": steps_per_s,
                "server_cpu_us_per_step": cpu}  # fmt: skip

    result = {
        "compute": [{"phase": "compute", "label": "batch 1", "batch": 1, "call_ms": 0.3, "steps_per_s": 3000.0}],
        "transport": [_load_row("sessions", 64, 8000)],
        "sessions": [],
        "multiplexed": [],
        "chunked": [],
        "idle": None,
        "peer": [
            peer("triton", 64, 2000, 400),
            peer("triton", 256, 2500, 300),
            peer("rnnserve (tritonclient)", 64, 3200, 180),
            peer("rnnserve (tritonclient)", 256, 2000, 450),
            {"phase": "peer", "label": "triton N=1024", "sessions": 1024, "error": "load.py failed"},
            peer("echo (tritonclient)", 64, 4000, 150),
            peer("echo (tritonclient)", 256, 3000, 120),
        ],
    }
    report.add_ratios(result)
    triton64, _, ours64, ours256, _, echo64, echo256 = result["peer"]
    assert triton64["ratio"] == pytest.approx(0.25) and triton64["ratio_to"] == "transport N=64"
    assert ours64["ratio"] == pytest.approx(1.6) and ours64["cpu_ratio"] == pytest.approx(0.45)
    assert ours256["ratio"] == pytest.approx(0.8) and "same client" in ours256["ratio_to"]
    # The echo (the Python gRPC floor under the same client) is compared with Triton too, and each rnnserve
    # row with the echo of its size.
    assert echo64["ratio"] == pytest.approx(2.0) and echo256["cpu_ratio"] == pytest.approx(0.4)
    assert ours64["ratio_echo"] == pytest.approx(0.8) and ours256["ratio_echo"] == pytest.approx(2000 / 3000)
    judged = report.targets(result)
    details = {t["target"]: t["detail"] for t in judged}
    assert details["rnnserve (tritonclient) N=256 >= 1.5x Triton's steps/s"].endswith("a bare Python gRPC echo: 1.20x")
    assert details["rnnserve (tritonclient) N=256 <= 0.5x Triton's server CPU per step"].endswith("echo: 0.40x")
    got = {t["target"]: t["pass"] for t in judged}
    assert got == {
        "rnnserve (tritonclient) N=64 >= 1.5x Triton's steps/s": True,
        "rnnserve (tritonclient) N=64 <= 0.5x Triton's server CPU per step": True,
        "rnnserve (tritonclient) N=256 >= 1.5x Triton's steps/s": False,
        "rnnserve (tritonclient) N=256 <= 0.5x Triton's server CPU per step": False,
    }
