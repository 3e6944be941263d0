"""``rnnserve bench``: rnnserve against the floor (a bare grpc.aio server answering the same RPCs) and,
with ``--peer triton``, Triton, under the same loads, in one run on the same machine.

The method: servers on the server CPUs and loads on other CPUs (``--server-cpus``/``--load-cpus``), so the
load's CPU never decides a server's figure; a row whose load CPUs were saturated is marked INVALID.
Per-session sequences come from Triton's C++ perf_analyzer over the KServe endpoint; the native API's rows
from rnnserve's own load generator. Each figure is the median of ``--repeat`` runs with the systems
alternating. Phases: the compute ceiling (always), kserve, native (per-session streams, multiplexed StepBatch,
chunked), idle (memory per open session) and scale (N worker processes on N CPUs against one; needs
redis-server and nginx).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

# Full-run defaults and --quick (smoke test) defaults; an explicit flag wins over both.
DEFAULTS: dict[str, Any] = {
    "sessions": [1, 16, 64, 256, 1024],
    "max_batch": 1024,
    "mux_sessions": 256,
    "chunk_sessions": 256,
    "chunk": 16,
    "idle_sessions": 100_000,
    "step_budget": 12_000,
    "min_steps": 20,
    "max_steps": 3_000,
    "compute_seconds": 0.5,
    "phase_timeout": 300.0,
    "scale_sessions": 256,
    "scale_workers": 0,  # 0: the CPUs not running loads, at least 2
    "repeat": 3,
    "window_ms": 2000,
}
QUICK: dict[str, Any] = {
    "sessions": [1, 4],
    "max_batch": 8,
    "mux_sessions": 4,
    "chunk_sessions": 4,
    "chunk": 4,
    "idle_sessions": 1_000,
    "step_budget": 200,
    "min_steps": 10,
    "max_steps": 200,
    "compute_seconds": 0.05,
    "phase_timeout": 60.0,
    "scale_sessions": 4,
    "scale_workers": 2,
    "repeat": 3,
    "window_ms": 300,
}
# The phases --phases and --skip choose from; the compute ceiling always runs (the ratios' base).
PHASES = ("kserve", "native", "idle", "scale")


def _phase_list(text: str) -> list[str]:
    values = [v for v in text.replace(",", " ").split() if v]
    unknown = [v for v in values if v not in PHASES]
    if unknown or not values:
        raise argparse.ArgumentTypeError(f"expected phases out of {', '.join(PHASES)}, got {text!r}")
    return values


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a list of integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError("session counts are positive integers")
    return values


def _cpus(text: str) -> list[int]:
    from rnnserve.bench.procs import parse_cpus

    try:
        return parse_cpus(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected CPUs like 0 or 0,2 or 0-3: {exc}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group("model (default: the 2-layer LSTM(64->256)+Linear(256->32), exported here)")
    model.add_argument("--repository", type=Path, metavar="DIR", help="bench a model from this repository")
    model.add_argument("--model", metavar="NAME", help="model name in --repository (default: its only model)")
    model.add_argument("--version", type=int, default=0, help="model version (default: newest)")

    method = parser.add_argument_group("method")
    method.add_argument(
        "--server-cpus", type=_cpus, metavar="CPUS", help="CPUs the servers run on (default 0; taskset's form)"
    )
    method.add_argument(
        "--load-cpus", type=_cpus, metavar="CPUS", help="CPUs the loads run on, none of the server's (default 1)"
    )
    method.add_argument("--repeat", type=int, metavar="R", help="runs per figure, median shown (default 3)")
    method.add_argument(
        "--window-ms", type=int, metavar="MS", help="perf_analyzer's measurement window (-p; default 2000)"
    )

    load = parser.add_argument_group("load")
    load.add_argument(
        "--sessions",
        type=_int_list,
        metavar="N,N,...",
        help="concurrent sessions, one stream each (default 1,16,64,256,1024)",
    )
    load.add_argument(
        "--steps", type=int, metavar="T", help="timesteps per session of a native run (default: from --step-budget)"
    )
    load.add_argument(
        "--step-budget",
        type=int,
        metavar="STEPS",
        help="steps per native run when --steps is not given (default 12000)",
    )
    load.add_argument(
        "--max-batch",
        type=int,
        metavar="B",
        help="largest compute batch; also the default model's max_batch_size (default 1024)",
    )
    load.add_argument("--mux-sessions", type=int, metavar="N", help="sessions in one StepBatch message (default 256)")
    load.add_argument("--chunk-sessions", type=int, metavar="N", help="sessions of the chunked rows (default 256)")
    load.add_argument("--chunk", type=int, metavar="C", help="timesteps per message in the chunked rows (default 16)")
    load.add_argument(
        "--idle-sessions", type=int, metavar="N", help="sessions opened for the idle-capacity phase (default 100000)"
    )
    load.add_argument(
        "--client-procs",
        type=int,
        default=0,
        metavar="P",
        help="rnnserve load generator processes (default: one per load CPU)",
    )
    load.add_argument("--compute-seconds", type=float, metavar="S", help="time per compute batch size (default 0.5)")
    load.add_argument(
        "--phase-timeout", type=float, metavar="S", help="abort a native run after this long (default 300)"
    )
    load.add_argument(
        "--server-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra `rnnserve serve` argument (repeatable), e.g. --server-arg=--max-queue-delay-us=200",
    )
    load.add_argument(
        "--scale-sessions", type=int, metavar="N", help="sessions of the scale phase, one stream each (default 256)"
    )
    load.add_argument(
        "--scale-workers",
        type=int,
        metavar="N",
        help="server processes (on N CPUs) of the scale phase's multi-process row (default: the CPUs no load "
        "runs on, at least 2)",
    )
    load.add_argument(
        "--phases",
        type=_phase_list,
        metavar="P,P,...",
        help=f"run only these phases (of {','.join(PHASES)}; default all); the compute ceiling always runs",
    )
    load.add_argument("--skip", action="append", default=[], choices=PHASES, help="skip a phase (repeatable)")

    out = parser.add_argument_group("output")
    out.add_argument("--quick", action="store_true", help="tiny model and sizes, short runs (smoke test)")
    out.add_argument("--json", type=Path, metavar="FILE", help="write every row, run, ratio and target as JSON")
    out.add_argument("--markdown", action="store_true", help="print the tables as markdown")
    out.add_argument("--workdir", type=Path, metavar="DIR", help="keep the exported model and server logs here")
    out.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    out.add_argument(
        "--peer", choices=["triton"], help="also run the Triton peer under perf_analyzer (needs /tmp/venv-triton)"
    )
    out.add_argument(
        "--check-targets",
        action="store_true",
        help="exit 1 when a target is missed (FAIL or INVALID); the targets apply to the default model at full "
        "sizes only, so this is refused with --quick or --repository",
    )


def _machine() -> dict[str, Any]:
    import grpc
    import numpy
    import onnxruntime

    cpu_model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model,
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
    }


def _finite(value: Any) -> Any:
    """JSON without NaN/Infinity (null instead), numpy scalars as Python numbers."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, str):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def default_cpus(available: set[int]) -> tuple[list[int], list[int]]:
    """Server on the lowest CPU this process may use, loads on the next one (one CPU: both on it, which the
    saturation rule and the header make visible)."""
    ordered = sorted(available)
    return [ordered[0]], [ordered[1] if len(ordered) > 1 else ordered[0]]


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    base = QUICK if args.quick else DEFAULTS
    chosen = {k: getattr(args, k) if getattr(args, k, None) is not None else v for k, v in base.items()}
    server, load = default_cpus(os.sched_getaffinity(0))
    chosen["server_cpus"] = args.server_cpus or server
    chosen["load_cpus"] = args.load_cpus or load
    chosen["client_procs"] = args.client_procs or len(chosen["load_cpus"])
    if not chosen["scale_workers"]:
        spare = (os.cpu_count() or 1) - len(chosen["load_cpus"])
        chosen["scale_workers"] = max(2, spare)
    return chosen


def _check(cfg: Any) -> str | None:
    """What is wrong with the settings, or None."""
    sizes = (cfg.chunk, cfg.max_batch, cfg.idle_sessions, cfg.mux_sessions, cfg.chunk_sessions, cfg.scale_sessions)
    if min(sizes) < 1:
        return "--chunk, --max-batch and session counts must be positive"
    if cfg.scale_workers < 2:
        return "--scale-workers must be at least 2 (the row compares N processes with one)"
    if cfg.repeat < 1 or cfg.window_ms < 50:
        return "--repeat must be at least 1 and --window-ms at least 50"
    allowed = os.sched_getaffinity(0)
    unknown = sorted(set(cfg.server_cpus + cfg.load_cpus) - allowed)
    if unknown:
        return f"CPUs {unknown} are not available here (this process may use {sorted(allowed)})"
    if set(cfg.server_cpus) & set(cfg.load_cpus) and len(allowed) > 1:
        return "--server-cpus and --load-cpus overlap: the load would take the server's CPU"
    return None


def run(args: argparse.Namespace) -> int:
    from rnnserve.bench import model as models
    from rnnserve.bench.measure import Bench, BenchConfig, PhaseSkipped
    from rnnserve.bench.procs import cpu_list
    from rnnserve.bench.progress import Progress

    if args.peer and args.repository:
        print("rnnserve bench: --peer triton serves its own LSTM: it compares only with the default model",
              file=sys.stderr)  # fmt: skip
        return 2
    note = targets_note(quick=args.quick, repository=args.repository)
    if args.check_targets and note:
        # Nothing would be judged, so an exit status of 0 would claim targets that were never checked.
        print(f"rnnserve bench: --check-targets has nothing to check: the project's targets {note}",
              file=sys.stderr)  # fmt: skip
        return 2
    settings = _settings(args)
    cfg = BenchConfig(
        steps=args.steps,
        server_args=list(args.server_arg),
        peer=args.peer,
        available_cpus=sorted(os.sched_getaffinity(0)),
        **settings,
    )
    if args.quick:
        # Smoke-test windows are short: any steady figure will do, a flaky stability check would fail CI.
        cfg.pa_max_trials, cfg.pa_stability = 10, 100
    problem = _check(cfg)
    if problem:
        print(f"rnnserve bench: {problem}", file=sys.stderr)
        return 2
    chosen = [p for p in (args.phases or PHASES) if p not in args.skip]
    progress = Progress(enabled=not args.quiet)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="rnnserve-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    # The bench itself (progress, /proc reads, stats calls) stays off the server CPUs.
    affinity = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cfg.load_cpus)

    # SIGTERM unwinds like Ctrl-C, through the cleanup below.
    def _terminate(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _terminate)
    bench: Bench | None = None
    config = {
        **settings,
        "steps": args.steps,
        "server_args": cfg.server_args,
        "quick": args.quick,
        "pa_max_trials": cfg.pa_max_trials,
        "pa_stability": cfg.pa_stability,
        "peer": args.peer,
    }
    result: dict[str, Any] = {
        "machine": _machine(),
        "config": config,
        "compute": [],
        "kserve": [],
        "native": [],
        "multiplexed": [],
        "chunked": [],
        "idle": None,
        "scale": [],
        "skipped": {},
        "errors": [],
        "targets": [],
        "targets_note": note,
    }
    progress.log(
        f"servers on CPU {cpu_list(cfg.server_cpus)}, loads on CPU {cpu_list(cfg.load_cpus)}; {cfg.repeat} runs per "
        f"figure; about {cfg.estimate_s() / 60:.0f} min for every phase"
    )
    try:
        if args.repository:
            names = [p.name for p in args.repository.iterdir() if p.is_dir()] if args.repository.is_dir() else []
            name = args.model or (names[0] if len(names) == 1 else None)
            if name is None:
                print(f"rnnserve bench: --model is needed: {args.repository} holds {sorted(names)}", file=sys.stderr)
                return 2
            bench_model = models.load_model(args.repository, name, args.version)
            repository = args.repository
        else:
            repository = workdir / "repository"
            shutil.rmtree(repository, ignore_errors=True)
            lstm = models.TINY if args.quick else models.LstmConfig()
            progress.log(f"exporting the LSTM step model ({lstm}) to {repository}")
            bench_model = models.build_lstm_repository(repository, lstm, max_batch_size=cfg.max_batch)
        result["model"] = bench_model.describe()
        bench = Bench(bench_model, repository, workdir, cfg, progress)
        bench.start()
        phases = [("compute", bench.compute)]
        methods = {"kserve": bench.kserve, "native": bench.native, "idle": bench.idle, "scale": bench.scale}
        phases += [(name, methods[name]) for name in PHASES if name in chosen]
        with progress.bar("phase", len(phases)) as start_phase:
            for name, phase in phases:
                start_phase(name)
                try:
                    rows = phase()
                except PhaseSkipped as exc:
                    progress.log(f"phase {name} SKIPPED: {exc}")
                    result["skipped"][name] = str(exc)
                    continue
                except Exception as exc:  # one failed phase must not lose the others' numbers
                    progress.log(f"phase {name} FAILED: {exc}")
                    result["errors"].append(f"{name}: {exc}")
                    continue
                if name == "idle":
                    result["idle"] = rows
                    continue
                for row in rows:
                    result[row["phase"]].append(row)
                    if "error" in row:
                        first = row["error"].splitlines()[0]  # the whole text (a traceback) is in the JSON
                        result["errors"].append(f"{row['phase']} {row.get('system', '')} {row['label']}: {first}")
        if args.peer and "kserve" in chosen and not any(r["system"] == "triton" for r in result["kserve"]):
            from rnnserve.bench.triton import missing

            result["skipped"].setdefault("peer", missing() or "perf_analyzer did not run")
    except KeyboardInterrupt:
        print("rnnserve bench: interrupted", file=sys.stderr)
        return 130
    finally:
        if bench is not None:
            bench.close()
        signal.signal(signal.SIGTERM, previous)
        os.sched_setaffinity(0, affinity)
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)

    code = finish(result, markdown=args.markdown, check_targets=args.check_targets)
    if args.json:
        args.json.write_text(json.dumps(_finite(result), indent=2) + "\n")
        progress.log(f"wrote {args.json}")
    return code


def targets_note(*, quick: bool, repository: Path | None) -> str | None:
    """Why the project's targets do not apply to this run (they are about the default model at full sizes)."""
    if quick:
        return "they apply to the default bench model at full sizes, not to --quick sizes"
    if repository is not None:
        return "they apply to the default bench model, not to a model of --repository"
    return None


def finish(result: dict[str, Any], *, markdown: bool, check_targets: bool) -> int:
    """Ratios and targets (where they apply) into ``result``, the report on stdout; the exit code: 1 when a
    run failed, or with ``check_targets`` when a target FAILed or was INVALID."""
    from rnnserve.bench import report

    report.add_ratios(result)
    result["targets"] = [] if result.get("targets_note") else report.targets(result)
    print(report.markdown_report(result) if markdown else report.text_report(result))
    if result["errors"]:
        return 1
    if check_targets and report.missed(result["targets"]):
        return 1
    return 0
