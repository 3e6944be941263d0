"""``rnnserve bench``: one real ``--quick`` run through the CLI (servers and loads pinned, perf_analyzer included),
the floor under the real perf_analyzer, pinning of the processes the bench starts, and the pure parts (parsing
perf_analyzer's output, medians, the saturation rule, ratios, targets, the exit code, markdown).

No timing assertions: only that every row was measured, with the structure and arithmetic the report promises.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from rnnserve.bench import cli, perf_analyzer, procs, report
from rnnserve.bench.measure import BenchConfig
from rnnserve.bench.model import TINY, build_lstm_repository

# The scale phase (N server processes behind the gateway versus one) needs both; CI installs them.
HAVE_SCALE = shutil.which("redis-server") is not None and (
    shutil.which("nginx") is not None or os.access("/usr/sbin/nginx", os.X_OK)
)
ALLOWED = sorted(os.sched_getaffinity(0))
SERVER_CPUS, LOAD_CPUS = [ALLOWED[0]], [ALLOWED[-1]]


# ---- the real thing -------------------------------------------------------------------------------------
def test_bench_quick_end_to_end(tmp_path: Path, perf_analyzer_path: Path) -> None:
    out = tmp_path / "bench.json"
    cpus = ["--server-cpus", procs.cpu_list(SERVER_CPUS), "--load-cpus", procs.cpu_list(LOAD_CPUS)]
    cmd = [sys.executable, "-m", "rnnserve.cli", "bench", "--quick", *cpus, "--json", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    result = json.loads(out.read_text())
    assert result["errors"] == []
    # Progress on stderr, the report (with where everything ran) on stdout.
    assert "[bench" in done.stderr and "kserve N=4 floor run 3/3" in done.stderr
    assert f"servers on CPU {SERVER_CPUS[0]}, loads on CPU {LOAD_CPUS[0]}" in done.stdout
    assert result["config"]["server_cpus"] == SERVER_CPUS and result["config"]["load_cpus"] == LOAD_CPUS

    assert [r["batch"] for r in result["compute"]] == [1, 2, 4, 8]
    for row in result["compute"]:
        assert len(row["runs"]) == 3 and row["steps_per_s_min"] <= row["steps_per_s"] <= row["steps_per_s_max"]

    expected = {
        ("kserve", "rnnserve", 1),
        ("kserve", "floor", 1),
        ("kserve", "rnnserve", 4),
        ("kserve", "floor", 4),
        ("native", "rnnserve", 1),
        ("native", "floor", 1),
        ("native", "rnnserve", 4),
        ("native", "floor", 4),
        ("multiplexed", "rnnserve", 4),
        ("multiplexed", "floor", 4),
        ("chunked", "rnnserve", 4),
        ("chunked", "floor", 4),
    }
    rows = [r for phase in ("kserve", "native", "multiplexed", "chunked") for r in result[phase]]
    assert {(r["phase"], r["system"], r["sessions"]) for r in rows} == expected
    for row in rows:
        assert len(row["runs"]) == 3 and "error" not in row, row
        assert row["steps_per_s_min"] <= row["steps_per_s"] <= row["steps_per_s_max"]
        assert row["p50_ms"] <= row["p99_ms"]
        assert row["load_cpu"] > 0 and row["invalid"] == (row["saturated"] > 0)
        # /proc counts CPU in 10 ms ticks: a quick run may read 0, never less.
        assert row["server_cpu_us_per_step"] >= 0 and row["client_cpu_us_per_step"] > 0
        if row["system"] == "rnnserve":
            assert row["mean_batch"] >= 1
            if not row["invalid"] and not result_floor(result, row)["invalid"]:
                assert row["vs_floor"] > 0
    # The floor's statistics satisfy perf_analyzer (it exits 0): one execution per request.
    for row in result["kserve"]:
        if row["system"] == "floor":
            assert row["mean_batch"] == 1.0
    assert result["idle"]["sessions"] == 1000 and result["idle"]["bytes_per_session"] > 0
    assert len(result["idle"]["runs"]) == 3
    # Targets are about the default model at full sizes: a quick run evaluates none, so fails none.
    assert result["targets"] == [] and "--quick" in result["targets_note"]
    assert "targets not evaluated" in done.stdout and "FAIL" not in done.stdout
    if HAVE_SCALE:
        _check_scale_rows(result, workers=2, sessions=4)
        assert f"scale: 2 workers on {min(2, len(ALLOWED))} CPUs behind the gateway do " in done.stdout
    else:
        assert result["scale"] == [] and "apt-get install redis-server nginx" in result["skipped"]["scale"]


def result_floor(result: dict, row: dict) -> dict:
    return next(r for r in result[row["phase"]] if r["system"] == "floor" and r["label"] == row["label"])


def _check_scale_rows(result: dict, *, workers: int, sessions: int) -> None:
    """One plain server on redis, 1 worker behind the gateway, N workers behind it, each on its CPUs."""
    assert "scale" not in result["skipped"]
    direct, one, many = result["scale"]
    assert [(r["processes"], r["gateway"]) for r in (direct, one, many)] == [(1, False), (1, True), (workers, True)]
    assert {r["sessions"] for r in result["scale"]} == {sessions}
    # N workers on N CPUs where the machine has them (the server CPU first).
    assert direct["cpus"] == one["cpus"] == SERVER_CPUS and many["cpus"][0] == SERVER_CPUS[0]
    assert len(many["cpus"]) == min(workers, len(ALLOWED))
    for row in (direct, one, many):
        assert len(row["runs"]) == 3 and "error" not in row
    for row in (one, many):
        assert row["gateway_cpu_us_per_step"] >= 0 and row["store_cpu_us_per_step"] >= 0
        assert row["mean_batch"] >= 1


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
    # stderr is a pipe: plain progress lines, the phases counted, no terminal control codes.
    assert "] phase 1/2: compute\n" in done.stderr and "] phase 2/2: scale\n" in done.stderr
    assert "\x1b" not in done.stderr
    assert "scale: skipped: redis-server" in done.stdout
    result = json.loads(out.read_text())
    assert result["errors"] == [] and result["scale"] == [] and result["native"] == []
    assert "apt-get install redis-server nginx" in result["skipped"]["scale"]


@pytest.mark.parametrize("where", ["--quick", "--repository"])
def test_check_targets_is_refused_where_the_targets_do_not_apply(tmp_path: Path, where: str) -> None:
    """The targets are about the default model at full sizes: a run that cannot judge them refuses to promise a
    check (exit 2, saying why) instead of exiting 0 with nothing checked."""
    repository = _two_versions(tmp_path / "repo") if where == "--repository" else None
    chosen = ["--quick"] if repository is None else ["--repository", str(repository)]
    only_compute = [f"--skip={phase}" for phase in cli.PHASES]
    cmd = [sys.executable, "-m", "rnnserve.cli", "bench", *chosen, *only_compute, "--quiet", "--check-targets"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    assert done.stdout == "" and "--check-targets has nothing to check" in done.stderr
    assert ("not to --quick sizes" if where == "--quick" else "not to a model of --repository") in done.stderr


def _two_versions(root: Path) -> Path:
    """A repository whose model ``lstm`` has versions 1 and 2 (the same artifact): the bench's model is the
    newest, and the server's statistics answer for both."""
    from rnnserve.manifest import ModelManifest

    model = build_lstm_repository(root, TINY, max_batch_size=8)
    second = model.version_dir.parent / "2"
    shutil.copytree(model.version_dir, second)
    ModelManifest.read(second).model_copy(update={"version": 2}).write(second)
    return root


def test_bench_of_a_model_with_two_versions_counts_its_batches(tmp_path: Path, perf_analyzer_path: Path) -> None:
    """The mean batch of every rnnserve row comes from the benched version's counters (not the other version's,
    which computed nothing), over KServe (perf_analyzer sent to that version) and the native API."""
    repository = _two_versions(tmp_path / "repo")
    out = tmp_path / "bench.json"
    cpus = ["--server-cpus", procs.cpu_list(SERVER_CPUS), "--load-cpus", procs.cpu_list(LOAD_CPUS)]
    cmd = [sys.executable, "-m", "rnnserve.cli", "bench", "--quick", "--repository", str(repository), *cpus]
    cmd += [
        "--phases",
        "kserve,native",
        "--sessions",
        "2",
        "--repeat",
        "1",
        "--quiet",
        "--markdown",
        "--json",
        str(out),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    result = json.loads(out.read_text())
    assert result["model"]["version"] == 2 and result["errors"] == []
    rows = [r for phase in ("kserve", "native", "multiplexed", "chunked") for r in result[phase]]
    ours = [r for r in rows if r["system"] == "rnnserve"]
    assert len(ours) == 4
    for row in ours:
        assert row["mean_batch"] is not None and row["mean_batch"] >= 1, row
    # The report's batch column shows it.
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in done.stdout.splitlines() if line[:1] == "|"]
    batch = report.LOAD_COLUMNS.index("batch")
    shown = [row[batch] for row in cells if len(row) == len(report.LOAD_COLUMNS) and row[1] == "rnnserve"]
    assert len(shown) == 4 and "-" not in shown, done.stdout


def test_floor_satisfies_perf_analyzer(tmp_path: Path, perf_analyzer_path: Path) -> None:
    """perf_analyzer's sequence load against the floor: it finds the model's metadata and config, takes the
    floor's statistics (a ``Server:`` section whose counts agree) and exits 0."""
    model = build_lstm_repository(tmp_path / "repo", TINY, max_batch_size=8)
    floor = procs.floor_server(model.version_dir, tmp_path, cpus=SERVER_CPUS).start()
    try:
        cmd = perf_analyzer.command(perf_analyzer_path, model.name, floor.address, 2, 200, max_trials=10, stability=100)
        done = procs.run_measured(cmd, cpus=LOAD_CPUS, timeout=120, workdir=tmp_path)
    finally:
        floor.stop()
    assert done.returncode == 0, done.output
    figures = perf_analyzer.parse(done.output)
    assert figures["steps_per_s"] > 0 and figures["count"] > 0
    server = done.output.split("Server:", 1)[1]
    counts = [int(line.split(":")[1]) for line in server.splitlines()[1:4]]
    assert counts[0] > 0 and len(set(counts)) == 1, server  # inference, execution, successful request counts
    assert done.cpu_s > 0 and done.wall_s > 0


def _allowed(pid: int) -> set[int]:
    """The CPUs every thread of ``pid`` may run on."""
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        for line in (task / "status").read_text().splitlines():
            if line.startswith("Cpus_allowed_list:"):
                found |= set(procs.parse_cpus(line.split(":", 1)[1].strip()))
    return found


def test_servers_and_loads_start_on_their_cpus(tmp_path: Path) -> None:
    """A server started for the bench has every thread on the server CPUs; a measured command on the load CPUs."""
    model = build_lstm_repository(tmp_path / "repo", TINY, max_batch_size=8)
    floor = procs.floor_server(model.version_dir, tmp_path, cpus=SERVER_CPUS).start()
    try:
        assert _allowed(floor.pid) == set(SERVER_CPUS)
    finally:
        floor.stop()
    probe = "import os; print(sorted(os.sched_getaffinity(0)))"
    done = procs.run_measured([sys.executable, "-c", probe], cpus=LOAD_CPUS, timeout=60, workdir=tmp_path)
    assert done.returncode == 0 and done.output.strip() == str(LOAD_CPUS)


# ---- perf_analyzer's command and output ---------------------------------------------------------------------
# What perf_analyzer 2.51 printed for one concurrency (time windows, sequence mode over gRPC streams).
PA_OUTPUT = """*** Measurement Settings ***
  Batch size: 1
  Service Kind: TRITON
  Using "time_windows" mode for stabilization
  Stabilizing using average throughput
  Measurement window: 1000 msec
  Using asynchronous calls for inference

Request concurrency: 16
  Client: 
    Request count: 27448
    Sequence count: 266 (71.7768 seq/sec)
    Throughput: 7406.5 infer/sec
    Avg latency: 2105 usec (standard deviation 877 usec)
    p50 latency: 2059 usec
    p90 latency: 2530 usec
    p95 latency: 2730 usec
    p99 latency: 3530 usec
    Avg gRPC time: 2104 usec ((un)marshal request/response 0 usec + response wait 2104 usec)
  Server: 
    Inference count: 27448
    Execution count: 3498
    Successful request count: 27448
    Avg request latency: 990 usec (overhead 0 usec + queue 475 usec + compute input 209 usec + compute infer 170 usec + compute output 135 usec)

Inferences/Second vs. Client Average Batch Latency
Concurrency: 16, throughput: 7406.5 infer/sec, latency 2105 usec
"""  # noqa: E501, W291 - its lines, as printed (with trailing spaces)
PA_UNSTABLE = """*** Measurement Settings ***
  Batch size: 1
  Measurement window: 1000 msec

Request concurrency: 1
Failed to obtain stable measurement within 6 measurement windows for concurrency 1. Please try to increase the --measurement-interval.
Failed to obtain stable measurement.
"""  # noqa: E501


def test_perf_analyzer_command_is_the_fields_sequence_load() -> None:
    cmd = perf_analyzer.command("/x/perf_analyzer", "lstm", "127.0.0.1:9", 64, 2000)
    assert " ".join(cmd) == (
        "/x/perf_analyzer -m lstm -u 127.0.0.1:9 -i grpc --streaming --sequence-length 100 "
        "--concurrency-range 64 -p 2000 -r 6 -s 50 --max-threads 1"
    )
    assert perf_analyzer.command("pa", "lstm", "127.0.0.1:9", 1, 2000, version=2)[-2:] == ["-x", "2"]


def test_perf_analyzer_output_is_parsed() -> None:
    assert perf_analyzer.parse(PA_OUTPUT) == {
        "steps_per_s": 7406.5,
        "p50_ms": pytest.approx(2.059),
        "p99_ms": pytest.approx(3.530),
        "count": 27448,
    }
    with pytest.raises(perf_analyzer.OutputError, match="lacks Throughput"):
        perf_analyzer.parse(PA_UNSTABLE)
    with pytest.raises(perf_analyzer.OutputError, match=r"no measurement.*connection refused"):
        perf_analyzer.parse("error: failed to get model metadata: connection refused\n")
    assert perf_analyzer.error_line(PA_UNSTABLE).startswith("Failed to obtain stable measurement within 6")


# ---- runs -> rows ---------------------------------------------------------------------------------------
def test_saturation_rule() -> None:
    assert report.load_fraction(1.8, 2.0, 1) == pytest.approx(0.9)
    assert report.load_fraction(1.8, 2.0, 2) == pytest.approx(0.45)
    assert report.saturated({"load_cpu": 0.9}) and not report.saturated({"load_cpu": 0.89})
    assert not report.saturated({})  # nothing measured on the load: nothing to mark


def test_summarize_medians_spread_and_invalid() -> None:
    runs = [
        {"steps_per_s": 300.0, "p50_ms": 2.0, "load_cpu": 0.5},
        {"steps_per_s": 100.0, "p50_ms": 9.0, "load_cpu": 0.95},
        {"steps_per_s": 200.0, "p50_ms": 1.0, "load_cpu": 0.4},
    ]
    row = report.summarize({"phase": "native", "system": "rnnserve", "label": "N=1", "sessions": 1}, runs)
    assert row["steps_per_s"] == 200.0 and row["p50_ms"] == 2.0  # each figure its own median
    assert (row["steps_per_s_min"], row["steps_per_s_max"]) == (100.0, 300.0)
    assert row["saturated"] == 1 and row["invalid"] and row["load_cpu"] == 0.95
    assert not report.usable(row)
    calm = report.summarize({"label": "x"}, [runs[0], runs[2]])
    assert calm["steps_per_s"] == 250.0 and not calm["invalid"] and report.usable(calm)
    failed = report.summarize({"label": "x"}, [runs[0], {"error": "perf_analyzer exited 99: boom"}, runs[2]])
    assert failed["error"] == "perf_analyzer exited 99: boom (1 of 3 runs)" and not report.usable(failed)


# ---- ratios, targets, exit code, markdown -------------------------------------------------------------------
def _row(phase: str, system: str, n: int, steps_per_s: float, p50: float = 1.0, **extra: Any) -> dict:
    runs = [{"steps_per_s": steps_per_s, "p50_ms": p50, "load_cpu": extra.pop("load_cpu", 0.3)}] * 3
    meta = {"phase": phase, "system": system, "load": "perf_analyzer", "label": f"N={n}", "sessions": n}
    return report.summarize({**meta, **extra}, runs)


def _result(*, peer: bool, server_cpus: list[int] | None = None) -> dict:
    compute = [
        report.summarize({"phase": "compute", "label": f"batch {b}", "batch": b}, [{"call_ms": c, "steps_per_s": s}])
        for b, c, s in ((1, 0.3, 3000.0), (256, 7.0, 36000.0))
    ]
    kserve = [
        _row("kserve", "rnnserve", 1, 2200, p50=0.45),
        _row("kserve", "floor", 1, 9000, p50=0.09),
        _row("kserve", "rnnserve", 16, 7400),
        _row("kserve", "floor", 16, 16000),
        _row("kserve", "rnnserve", 64, 13000),
        _row("kserve", "floor", 64, 15000, load_cpu=0.95),
        _row("kserve", "rnnserve", 256, 7500),
        _row("kserve", "floor", 256, 14000),
    ]
    if peer:
        kserve += [_row("kserve", "triton", 1, 700), _row("kserve", "triton", 16, 4000)]
    return {
        "config": {"server_cpus": server_cpus or [0], "load_cpus": [1], "repeat": 3},
        "compute": compute,
        "kserve": kserve,
        "native": [],
        "multiplexed": [_row("multiplexed", "rnnserve", 256, 27000)],
        "chunked": [],
        "scale": [],
        "idle": report.summarize(
            {"phase": "idle", "label": "100000 open sessions", "sessions": 100_000, "state_bytes": 4096},
            [{"bytes_per_session": 5400.0}, {"bytes_per_session": 5500.0}, {"bytes_per_session": 5300.0}],
        ),
        "skipped": {},
        "errors": [],
        "targets_note": None,
    }


def test_ratios_to_floor_peer_and_compute() -> None:
    result = _result(peer=True)
    report.add_ratios(result)
    rows = {(r["system"], r["sessions"]): r for r in result["kserve"]}
    assert rows["rnnserve", 1]["vs_floor"] == pytest.approx(2200 / 9000)
    assert rows["rnnserve", 1]["vs_peer"] == pytest.approx(2200 / 700)
    assert rows["triton", 16]["vs_floor"] == pytest.approx(0.25) and "vs_peer" not in rows["triton", 16]
    assert "vs_floor" not in rows["rnnserve", 64]  # its floor's load was saturated: no figure to divide by
    assert result["multiplexed"][0]["vs_compute"] == pytest.approx(0.75)
    assert result["compute"][1]["ratio"] == pytest.approx(12.0)
    assert result["idle"]["ratio"] == pytest.approx(5400 / 6144)


def test_targets_pass_fail_invalid_and_not_measured() -> None:
    found = {t["target"]: (t["status"], t["detail"]) for t in report.targets(_result(peer=True))}
    assert found == {
        "1 session(s) >= 3x Triton's steps/s": ("PASS", "3.14x (2,200 vs 700 steps/s)"),
        "1 session p50 <= floor p50 + batch-1 compute + 100 us": (
            "PASS",
            "0.450 vs 0.490 ms (floor 0.090 + compute 0.300 + 0.1)",
        ),
        "16 session(s) >= 2x Triton's steps/s": ("FAIL", "1.85x (7,400 vs 4,000 steps/s)"),
        "64 sessions >= 0.75x the floor's steps/s on one server CPU": (
            "INVALID",
            "floor N=64: load CPUs saturated in 3 of 3 runs",
        ),
        "256 sessions >= 0.75x the floor's steps/s on one server CPU": ("FAIL", "0.54x (7,500 vs 14,000 steps/s)"),
        "multiplexed StepBatch of 256 sessions >= 0.6x compute batch 256 on one server CPU": (
            "PASS",
            "0.75x (27,000 vs 36,000 steps/s)",
        ),
        "idle memory per session <= 1.2x raw state + 2 KiB at 100,000 sessions": ("PASS", "5,400 vs 6,963 bytes"),
    }


def test_peer_targets_without_a_peer_run_are_not_measured() -> None:
    found = {t["target"]: t for t in report.targets(_result(peer=False, server_cpus=[0, 1]))}
    for n in (1, 16):
        target = found[f"{n} session(s) >= {3 if n == 1 else 2}x Triton's steps/s"]
        assert target["status"] == "NOT MEASURED" and target["detail"] == "not measured (no --peer triton)"
    # Per-CPU targets do not apply to a server given two CPUs.
    assert found["256 sessions >= 0.75x the floor's steps/s on one server CPU"]["status"] == "NOT MEASURED"
    assert not report.missed([t for t in found.values() if t["status"] == "NOT MEASURED"])


def _finished(result: dict, **kw: Any) -> tuple[int, str]:
    import contextlib
    import io

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = cli.finish(result, **kw)
    return code, printed.getvalue()


def _with_report_fields(result: dict) -> dict:
    result["model"] = {"name": "lstm", "version": 1, "format": "onnx", "state_bytes": 4096}
    result["machine"] = {"cpus": 2, "cpu_model": "test CPU"}
    result["config"].update(client_procs=1, window_ms=2000, pa_max_trials=6, pa_stability=50)
    return result


def test_check_targets_exit_codes() -> None:
    failing = _with_report_fields(_result(peer=True))
    assert _finished(failing, markdown=False, check_targets=True)[0] == 1
    assert _finished(_with_report_fields(_result(peer=True)), markdown=False, check_targets=False)[0] == 0
    # Only the targets that pass or cannot be measured here: exit 0.
    passing = _with_report_fields(_result(peer=False))
    passing["kserve"] = [r for r in passing["kserve"] if r["sessions"] not in (1, 64, 256)]
    code, text = _finished(passing, markdown=False, check_targets=True)
    assert code == 0 and "NOT MEASURED  16 session(s) >= 2x Triton's steps/s: not measured (no --peer" in text
    # Where targets do not apply nothing is judged, so nothing fails.
    quick = _with_report_fields(_result(peer=True))
    quick["targets_note"] = cli.targets_note(quick=True, repository=None)
    code, text = _finished(quick, markdown=False, check_targets=True)
    assert code == 0 and quick["targets"] == [] and "FAIL" not in text and "not evaluated" in text
    assert "--repository" in (cli.targets_note(quick=False, repository=Path("r")) or "")
    assert cli.targets_note(quick=False, repository=None) is None
    # A failed run fails the bench whatever the targets say.
    broken = _with_report_fields(_result(peer=False))
    broken["errors"] = ["kserve rnnserve N=1: perf_analyzer exited 99"]
    assert _finished(broken, markdown=False, check_targets=False)[0] == 1


def test_markdown_report() -> None:
    result = _with_report_fields(_result(peer=True))
    code, text = _finished(result, markdown=True, check_targets=False)
    lines = text.splitlines()
    assert code == 0 and lines[2].startswith("pinned: servers on CPU 0, loads on CPU 1")
    tables = [line for line in lines if line.startswith("|")]
    # Two tables: header and separator each, 2 compute rows, 10 kserve rows and the multiplexed row.
    assert len(tables) == 2 + 2 + 2 + 10 + 1
    assert tables[2].startswith("| batch 1 | 0.300 | 3,000 | 3,000-3,000 | 1.00 |")
    floor64 = next(line for line in tables if line.startswith("| kserve | floor | perf_analyzer | N=64 |"))
    assert "(15,000)" in floor64 and "INVALID: load CPUs saturated in 3 of 3 runs" in floor64
    assert "- **FAIL** 16 session(s) >= 2x Triton's steps/s: 1.85x" in text
    assert "- idle: 100,000 open sessions: 5,400 bytes/session (5,300-5,500)" in text
    quick = _with_report_fields(_result(peer=True))
    quick["targets_note"] = cli.targets_note(quick=True, repository=None)
    text = _finished(quick, markdown=True, check_targets=False)[1]
    assert text.splitlines()[-1] == f"- targets not evaluated: {quick['targets_note']}"


def _scale_row(label: str, processes: int, gateway: bool, steps_per_s: float) -> dict:
    meta = {"phase": "scale", "system": "rnnserve", "load": "rnnserve load", "label": label, "sessions": 256}
    meta.update(processes=processes, gateway=gateway, cpus=list(range(processes)))
    return report.summarize(meta, [{"steps_per_s": steps_per_s, "load_cpu": 0.5}])


def test_scale_ratios() -> None:
    def fresh() -> list[dict]:
        return [
            _scale_row("N=256, 1 process, no gateway", 1, False, 3000),
            _scale_row("N=256, 1 worker + gateway", 1, True, 2400),
            _scale_row("N=256, 4 workers + gateway", 4, True, 6000),
        ]

    rows = fresh()
    native = [_row("native", "rnnserve", 64, 3000), _row("native", "rnnserve", 256, 4000)]
    result = {"native": native, "scale": rows}
    report.add_scale_ratios(result)
    direct, one, many = rows
    assert direct["ratio"] == pytest.approx(0.75)  # the store's cost: vs the plain N=256 row
    assert one["ratio"] == pytest.approx(0.8)  # the gateway hop: vs the same server on the same store
    assert one["ratio_direct"] == pytest.approx(0.6)  # gateway and store together
    assert many["ratio"] == pytest.approx(2.5) and "scale-out gain" in many["ratio_to"]
    (line,) = report.scale_summary(result)
    assert line.startswith("scale: 4 workers on 4 CPUs behind the gateway do 2.50x the steps/s of 1 worker on 1 CPU")
    assert "0.60x of native rnnserve N=256" in line
    # Without the plain row of the same size (not measured in this run) there is no ratio to it.
    alone = {"native": [], "scale": fresh()}
    report.add_scale_ratios(alone)
    assert "ratio" not in alone["scale"][0] and "ratio_direct" not in alone["scale"][1]
    assert alone["scale"][2]["ratio"] == pytest.approx(2.5)
    assert report.scale_summary({"skipped": {"scale": "nginx not installed"}}) == [
        "scale: skipped: nginx not installed"
    ]


def test_scale_workers_take_spare_cpus_before_the_load_cpus() -> None:
    settings = {k: v for k, v in cli.DEFAULTS.items() if k != "scale_workers"}
    cfg = BenchConfig(client_procs=1, server_cpus=[2], load_cpus=[1], available_cpus=[0, 1, 2, 3], **settings)
    assert cfg.scale_cpus(1) == [2] and cfg.scale_cpus(3) == [2, 0, 3] and cfg.scale_cpus(4) == [2, 0, 3, 1]
    two = BenchConfig(client_procs=1, server_cpus=[0], load_cpus=[1], available_cpus=[0, 1], **settings)
    assert two.scale_cpus(2) == [0, 1] and two.scale_cpus(3) == [0, 1]


def test_cpu_lists() -> None:
    assert procs.parse_cpus("0-3,6") == [0, 1, 2, 3, 6] and procs.cpu_list([6, 0, 1, 2, 3]) == "0-3,6"
    with pytest.raises(ValueError):
        procs.parse_cpus("3-1")
    assert cli.default_cpus({0, 1}) == ([0], [1]) and cli.default_cpus({5}) == ([5], [5])
    assert math.isnan(report.load_fraction(1.0, 0.0, 1))
