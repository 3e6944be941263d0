"""Triton's own tools against rnnserve's KServe endpoint: the real ``perf_analyzer`` binary in every way a
Triton user runs it on a sequence model, and ``tritonclient`` reading the statistics it relies on."""

from __future__ import annotations

import csv
import queue
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import ServerHandle

from rnnserve.bench.model import TINY, build_lstm_repository
from rnnserve.server.scheduling.stats import BatchStats

tritonclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.grpc import service_pb2, service_pb2_grpc  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

MODEL = "lstm"
REQUESTS = 100  # per perf_analyzer run: --request-count measures exactly this many, no stability search
SEQUENCE_LENGTH = 20


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("repo")
    build_lstm_repository(root, TINY, max_batch_size=96)
    return root


@pytest.fixture(scope="module")
def server(repository: Path) -> Iterator[ServerHandle]:
    handle = ServerHandle(repository)
    yield handle
    handle.stop()


@pytest.fixture
def triton(server: ServerHandle) -> Iterator:
    client = tritonclient.InferenceServerClient(server.address)
    yield client
    client.close()


# ---- perf_analyzer -------------------------------------------------------------------------------------------
def _count(label: str, text: str) -> int:
    found = re.search(rf"^\s*{label}: (\d+)", text, re.MULTILINE)
    assert found, f"no '{label}' in perf_analyzer's output:\n{text}"
    return int(found.group(1))


# Unary calls at a fixed rate without --serial-sequences: perf_analyzer may send a sequence's next request, on
# another call, before its START is answered, and separate calls have no order a server could keep; one that
# overtakes its START is refused with Triton's own words, as Triton refuses it (a loaded CI run met this once).
# (With --serial-sequences, perf_analyzer 2.51's unary rate mode hung in 2 of 17 runs here, waiting to the end.)
OVERTAKEN_START = re.compile(
    r"Thread \[\d+\] had error: inference request for sequence \d+ to model '\w+' must specify the START flag[^\n]*"
)
UNORDERED = {"rate-unary"}


def run_perf_analyzer(executable: Path, server: ServerHandle, *args: str, unordered: bool = False) -> None:
    """Run it to the end and check its server-side section against its client side; ``unordered``: the mode
    sends a sequence's requests on separate calls without waiting (``OVERTAKEN_START``)."""
    command = [str(executable), "-m", MODEL, "-u", server.address, "-i", "grpc", "--sequence-length"]
    command += [str(SEQUENCE_LENGTH), *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    checked = OVERTAKEN_START.sub("", out) if unordered else out
    assert "must be the same" not in checked and "error" not in checked.lower(), out
    client_side, server_side = out.split("Server:", 1)
    sent = _count("Request count", client_side)
    inferences = _count("Inference count", server_side)
    executions = _count("Execution count", server_side)
    assert _count("Successful request count", server_side) == inferences
    # The server reads its counters a moment apart from the client's last answers: a step or two in flight.
    assert abs(inferences - sent) <= 8, out
    assert 1 <= executions <= inferences, out
    assert re.search(
        r"Avg request latency: \d+ usec \(overhead \d+ usec \+ queue \d+ usec \+ compute input \d+ usec"
        r" \+ compute infer \d+ usec \+ compute output \d+ usec\)",
        server_side,
    ), out


MODES = {
    "streaming": ["--streaming", "--concurrency-range", "2"],
    "unary-async": ["--async", "--concurrency-range", "2"],
    "unary-sync": ["--sync", "--concurrency-range", "2"],
    "rate-streaming": ["--streaming", "--request-rate-range", "100", "--num-of-sequences", "3"],
    "rate-unary": ["--request-rate-range", "100", "--num-of-sequences", "3"],
    "sequence-id-range": ["--streaming", "--sequence-id-range", "100:104", "--concurrency-range", "2"],
    "serial-sequences": ["--streaming", "--serial-sequences", "--request-rate-range", "100", "--num-of-sequences", "3"],
    "input-zero": ["--input-data", "zero", "--concurrency-range", "2"],
    "input-random": ["--streaming", "--input-data", "random", "--concurrency-range", "2"],
}


@pytest.mark.parametrize("mode", MODES)
def test_perf_analyzer_mode(perf_analyzer_path: Path, server: ServerHandle, mode: str) -> None:
    run_perf_analyzer(
        perf_analyzer_path, server, *MODES[mode], "--request-count", str(REQUESTS), unordered=mode in UNORDERED
    )


def test_perf_analyzer_time_windows_write_csv_with_server_columns(
    perf_analyzer_path: Path, server: ServerHandle, tmp_path: Path
) -> None:
    # Measurement windows as users run it (the stability bar set wide: this checks the protocol, not the host).
    out = tmp_path / "out.csv"
    run_perf_analyzer(
        perf_analyzer_path,
        server,
        "--streaming",
        "--concurrency-range",
        "2",
        "-p",
        "500",
        "-r",
        "4",
        "-s",
        "1000",
        "-f",
        str(out),
    )
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 1 and rows[0]["Concurrency"] == "2"
    for column in ("Server Queue", "Server Compute Input", "Server Compute Infer", "Server Compute Output"):
        assert rows[0][column].isdigit(), rows[0]
    assert float(rows[0]["Inferences/Second"]) > 0


# ---- statistics: cumulative, per exact batch size ------------------------------------------------------------
def _counters(stats: BatchStats) -> list[int]:
    return [
        stats.success, stats.success_queue_ns, stats.input_ns, stats.infer_ns, stats.output_ns, stats.fail,
        stats.fail_ns, stats.batches, stats.steps, stats.compute_ns, stats.queue_ns, stats.latency_ns,
    ]  # fmt: skip


def test_batch_stats_grow_and_count_each_exact_batch_size() -> None:
    stats = BatchStats()
    before = _counters(stats)
    # Shrinking batches whose compute time shrinks too: a mean-based figure would go down here.
    batches = [(96, 900_000), (37, 400_000), (5, 60_000), (1, 20_000), (1, 20_000), (37, 350_000)]
    for end, (size, compute) in enumerate(batches, start=1):
        stats.record(size, queue_ns=size * 1_000, input_ns=compute // 10, infer_ns=compute // 2,
                     output_ns=compute - compute // 10 - compute // 2, end_ns=end)  # fmt: skip
        now = _counters(stats)
        assert all(b <= a for b, a in zip(before, now, strict=True)), (before, now)
        before = now
    assert sorted(stats.sizes) == [1, 5, 37, 96]
    assert {size: per[0] for size, per in stats.sizes.items()} == {96: 1, 37: 2, 5: 1, 1: 2}
    assert stats.sizes[37][2] == 400_000 // 2 + 350_000 // 2  # infer ns, per execution
    assert stats.success == stats.steps == sum(size for size, _ in batches)
    # Per request: a step's compute time is its batch's.
    assert stats.infer_ns == sum(size * (compute // 2) for size, compute in batches)
    assert stats.input_ns + stats.infer_ns + stats.output_ns == sum(size * compute for size, compute in batches)


def test_batch_stats_count_refused_rows_and_failed_batches_as_failures() -> None:
    stats = BatchStats()
    stats.record(4, queue_ns=4_000, input_ns=100, infer_ns=1_000, output_ns=100, end_ns=1, refused=1)
    assert (stats.steps, stats.success, stats.fail) == (4, 3, 1)
    assert stats.sizes == {4: [1, 100, 1_000, 100]}  # the execution ran at its full size
    assert stats.infer_ns == 3 * 1_000 and stats.success_queue_ns == 3_000
    assert stats.fail_ns == 1_000 + 1_200
    stats.failed(2, 5_000)
    assert (stats.success, stats.fail, stats.fail_ns, stats.batches) == (3, 3, 7_200, 1)


def _statistics(triton):
    (s,) = triton.get_inference_statistics(MODEL).model_stats
    return s


def _triton_counters(s) -> list[int]:
    i = s.inference_stats
    durations = [i.success, i.fail, i.queue, i.compute_input, i.compute_infer, i.compute_output]
    return [s.inference_count, s.execution_count, s.last_inference, *(d.count for d in durations)] + [
        d.ns for d in durations
    ]


def _by_size(s) -> dict[int, list[int]]:
    return {
        b.batch_size: [b.compute_input.count, b.compute_infer.count, b.compute_output.count,
                       b.compute_input.ns, b.compute_infer.ns, b.compute_output.ns]
        for b in s.batch_stats
    }  # fmt: skip


def _check_consistent(s) -> None:
    # As perf_analyzer reads them: one count per request for success, queue and each compute part ...
    i = s.inference_stats
    counts = {i.success.count, i.queue.count, i.compute_input.count, i.compute_infer.count, i.compute_output.count}
    assert counts == {s.inference_count}, s
    # ... and per exact batch size, one per execution.
    sizes = _by_size(s)
    assert sum(size * counts[0] for size, counts in sizes.items()) == s.inference_count, s
    assert sum(counts[0] for counts in sizes.values()) == s.execution_count, s
    assert all(len(set(counts[:3])) == 1 for counts in sizes.values()), s


def test_tritonclient_statistics_never_decrease_while_batches_shrink(repository: Path) -> None:
    # A long queue delay gathers each round of 96 pipelined STARTs into large batches; then one sequence's
    # steps run alone, in batches of 1.
    handle = ServerHandle(repository, max_queue_delay_us=20_000)
    triton = tritonclient.InferenceServerClient(handle.address)
    try:
        x = np.ones((1, TINY.input_size), np.float32)
        inp = tritonclient.InferInput("x", [1, TINY.input_size], "FP32")
        inp.set_data_from_numpy(x)
        answers: queue.Queue = queue.Queue()
        triton.start_stream(callback=lambda result, error: answers.put(error))
        for step in range(2):
            for seq in range(1, 97):
                triton.async_stream_infer(MODEL, [inp], sequence_id=seq, sequence_start=step == 0)
            assert [answers.get(timeout=30) for _ in range(96)] == [None] * 96
        triton.stop_stream()
        first = _statistics(triton)
        assert first.inference_count == 192 and max(_by_size(first)) > 1
        for step in range(6):
            triton.infer(MODEL, [inp], sequence_id=1000, sequence_start=step == 0)
        second = _statistics(triton)
        assert second.inference_count == 198
        before, after = _triton_counters(first), _triton_counters(second)
        assert all(a <= b for a, b in zip(before, after, strict=True)), (before, after)
        first_sizes, second_sizes = _by_size(first), _by_size(second)
        assert second_sizes[1][0] == first_sizes.get(1, [0])[0] + 6
        for size, counts in first_sizes.items():
            assert all(a <= b for a, b in zip(counts, second_sizes[size], strict=True)), size
        _check_consistent(first)
        _check_consistent(second)
    finally:
        triton.close()
        handle.stop()


# ---- the stream's final-response flag, server metadata -------------------------------------------------------
def _stream_one(triton, **kwargs) -> tuple:
    answers: queue.Queue = queue.Queue()
    triton.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        x = np.zeros((1, TINY.input_size), np.float32)
        inp = tritonclient.InferInput("x", [1, TINY.input_size], "FP32")
        inp.set_data_from_numpy(x)
        triton.async_stream_infer(MODEL, [inp], sequence_id=7, sequence_start=True, sequence_end=True, **kwargs)
        return answers.get(timeout=30)
    finally:
        triton.stop_stream()


def test_stream_response_is_marked_final_when_asked(triton) -> None:
    result, error = _stream_one(triton, enable_empty_final_response=True)
    assert error is None
    response = result.get_response()
    assert response.parameters["triton_final_response"].bool_param is True
    assert result.as_numpy("y").shape == (1, TINY.output)  # the one real response is the final one
    result, error = _stream_one(triton)
    assert error is None and "triton_final_response" not in result.get_response().parameters


def test_empty_final_response_parameter_must_be_a_bool(server: ServerHandle, triton) -> None:
    request = service_pb2.ModelInferRequest(model_name=MODEL)
    request.parameters["triton_enable_empty_final_response"].int64_param = 1
    request.parameters["sequence_id"].int64_param = 9
    request.parameters["sequence_start"].bool_param = True
    tensor = request.inputs.add(name="x", datatype="FP32", shape=[1, TINY.input_size])
    tensor.contents.fp32_contents.extend([0.0] * TINY.input_size)
    with grpc.insecure_channel(server.address) as channel, pytest.raises(grpc.RpcError) as info:
        service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'triton_enable_empty_final_response'" in info.value.details()
    assert "expected bool_param" in info.value.details()
    # Refused before anything changed: sequence 9 was never started.
    with pytest.raises(InferenceServerException, match="must specify the START flag"):
        x = tritonclient.InferInput("x", [1, TINY.input_size], "FP32")
        x.set_data_from_numpy(np.zeros((1, TINY.input_size), np.float32))
        triton.infer(MODEL, [x], sequence_id=9)


def test_server_metadata_lists_what_is_served(triton) -> None:
    extensions = set(triton.get_server_metadata().extensions)
    assert extensions == {"model_repository", "model_configuration", "statistics", "sequence"}
    # Each one answers: the repository index (its load and unload: tests/integration/test_kserve.py), the model's
    # configuration with its sequence batching, statistics, and a sequence step.
    assert {(m.name, m.state) for m in triton.get_model_repository_index().models} == {(MODEL, "READY")}
    assert triton.get_model_config(MODEL).config.HasField("sequence_batching")
    assert triton.get_inference_statistics(MODEL).model_stats[0].name == MODEL
    result, error = _stream_one(triton)
    assert error is None and result.as_numpy("y").shape == (1, TINY.output)
