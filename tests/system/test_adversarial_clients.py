"""Hostile and crashing clients against a real ``rnnserve serve`` process: refused requests do not stay in
the server's memory, and a client killed mid-stream leaves no unread errors behind in the server's log."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import TINY_INPUT, tiny_expected

from rnnserve.bench.procs import ServerProcess, memory, rnnserve_server
from rnnserve.client import Client
from rnnserve.proto import kserve_grpc_service_pb2 as kpb
from rnnserve.proto import rnnserve_pb2 as pb
from rnnserve.tensors import to_proto

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RSS from /proc")

C = grpc.StatusCode
NATIVE = "/rnnserve.v1.RnnServe/"
KSERVE = "/inference.GRPCInferenceService/"
BIG = 1_000_000  # float32 elements: a 4 MB tensor, under every default limit
REFUSALS_PER_KIND = 96
CLIENTS = 4
MAX_GROWTH_BYTES = 200 * 1024 * 1024  # a leak keeps ~3 copies of each request: over 1 GB per kind
UNREAD = "exception was never retrieved"


def serve(tiny_repository: Path, workdir: Path, *extra: str) -> ServerProcess:
    return rnnserve_server(tiny_repository, workdir, tag="adversarial", max_sessions=100, extra=extra).start()


def open_session(channel: grpc.Channel) -> str:
    raw = channel.unary_unary(NATIVE + "OpenSession")(pb.OpenSessionRequest(model="gru").SerializeToString())
    return pb.OpenSessionResponse.FromString(raw).session_id


def infer_request(shape: list[int], data: bytes) -> kpb.ModelInferRequest:
    tensor = kpb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=shape)
    return kpb.ModelInferRequest(model_name="gru", inputs=[tensor], raw_input_contents=[data])


def refuse(address: str, method: str, payload: bytes, count: int) -> list[C]:
    """Send ``payload`` ``count`` times over one channel; the status codes the server answered."""
    codes = []
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary(method)
        for _ in range(count):
            try:
                call(payload, timeout=60)
                codes.append(C.OK)
            except grpc.RpcError as err:
                codes.append(err.code())
    return codes


def refuse_together(address: str, method: str, payload: bytes, total: int) -> set[C]:
    """``total`` such calls from ``CLIENTS`` concurrent clients; the status codes answered."""
    with ThreadPoolExecutor(CLIENTS) as pool:
        runs = [pool.submit(refuse, address, method, payload, total // CLIENTS) for _ in range(CLIENTS)]
        return {code for run in runs for code in run.result()}


def test_refused_large_requests_do_not_stay_in_memory(tiny_repository, tmp_path):
    server = serve(tiny_repository, tmp_path)
    try:
        with grpc.insecure_channel(server.address) as channel:
            healthy = open_session(channel)
        big = to_proto(np.ones(BIG, np.float32))
        kinds = {
            "unknown session": (
                NATIVE + "Step",
                pb.StepRequest(session_id="0" * 32, inputs={"x": big}).SerializeToString(),
                C.NOT_FOUND,
            ),
            "wrong shape": (
                NATIVE + "Step",
                pb.StepRequest(session_id=healthy, inputs={"x": big}).SerializeToString(),
                C.INVALID_ARGUMENT,
            ),
            "KServe wrong shape": (
                KSERVE + "ModelInfer",
                infer_request([1, BIG], np.ones(BIG, np.float32).tobytes()).SerializeToString(),
                C.INVALID_ARGUMENT,
            ),
        }
        for method, payload, _ in kinds.values():  # warm-up: the allocator's arenas reach their size
            refuse_together(server.address, method, payload, 2 * CLIENTS)
        baseline = memory(server.pid)["VmRSS"]
        for kind, (method, payload, expected) in kinds.items():
            assert refuse_together(server.address, method, payload, REFUSALS_PER_KIND) == {expected}, kind
            growth = memory(server.pid)["VmRSS"] - baseline
            assert growth < MAX_GROWTH_BYTES, f"RSS grew {growth / 2**20:.0f} MiB after refused {kind} requests"
        # The refused steps changed nothing, and the server still steps correctly.
        xs = np.random.default_rng(0).standard_normal((5, TINY_INPUT)).astype(np.float32)
        with Client(server.address, timeout=30) as client:
            assert client.health() == "SERVING"
            session = client.session("gru")
            assert session.steps == 0
            ys = np.stack(list(session.stream(xs)))
            session.close()
        np.testing.assert_allclose(ys, tiny_expected(xs)[0], rtol=1e-5, atol=1e-6)
    finally:
        server.stop()


# A client that streams ``n`` steps of one sequence, says when the first is answered, and waits to be killed.
DOOMED_CLIENT = textwrap.dedent(
    """
    import sys, time
    import grpc, numpy as np
    from rnnserve.proto import kserve_grpc_service_pb2 as kpb
    from rnnserve.proto import rnnserve_pb2 as pb
    from rnnserve.tensors import to_proto

    address, api, sid, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    x = np.zeros(3, np.float32)

    def native():
        for i in range(1, n + 1):
            step = pb.StepRequest(session_id=sid, inputs={"x": to_proto(x)}, step_index=i)
            yield pb.StreamStepRequest(steps=[step]).SerializeToString()
        time.sleep(3600)

    def kserve():
        for i in range(n):
            tensor = kpb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[1, 3])
            request = kpb.ModelInferRequest(model_name="gru", inputs=[tensor], raw_input_contents=[x.tobytes()])
            request.parameters["sequence_id"].string_param = sid
            request.parameters["sequence_start"].bool_param = i == 0
            yield request.SerializeToString()
        time.sleep(3600)

    channel = grpc.insecure_channel(address)
    if api == "native":
        call = channel.stream_stream("/rnnserve.v1.RnnServe/StreamStep")(native())
    else:
        call = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer")(kserve())
    for _ in call:
        print("answered", flush=True)
    """
)


def run_doomed_client(address: str, api: str, sid: str, steps: int) -> None:
    """Start the client, let its first step be answered (the others are queued behind it), then kill it."""
    proc = subprocess.Popen(
        [sys.executable, "-c", DOOMED_CLIENT, address, api, sid, str(steps)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "answered"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)


def test_a_client_killed_mid_stream_leaves_no_unread_errors(tiny_repository, tmp_path):
    # Each batch waits up to 0.5 s for company, so a lone session's streamed steps stay queued for a while:
    # when its client dies they are still queued, and they fail once their session is closed (native) or its
    # sequence is started again (KServe). Nobody reads those failures; they must not be logged as unread.
    server = serve(
        tiny_repository, tmp_path, "--max-queue-delay-us", "500000", "--max-batch-size", "64", "--inline-budget-us", "0"
    )
    try:
        with grpc.insecure_channel(server.address) as channel:
            sid = open_session(channel)
            run_doomed_client(server.address, "native", sid, 40)
            channel.unary_unary(NATIVE + "CloseSession")(pb.SessionRequest(session_id=sid).SerializeToString())
            run_doomed_client(server.address, "kserve", "doomed-sequence", 40)
            restart = infer_request([1, TINY_INPUT], np.zeros(TINY_INPUT, np.float32).tobytes())
            restart.parameters["sequence_id"].string_param = "doomed-sequence"
            restart.parameters["sequence_start"].bool_param = True
            restart.parameters["sequence_end"].bool_param = True
            # Answered once a batch formed after the closed sessions' queued steps failed.
            channel.unary_unary(KSERVE + "ModelInfer")(restart.SerializeToString(), timeout=60)
            with Client(server.address, timeout=30) as client, client.session("gru") as session:
                xs = np.ones((2, TINY_INPUT), np.float32)
                np.testing.assert_allclose(
                    np.stack([session.step(x) for x in xs]), tiny_expected(xs)[0], rtol=1e-5, atol=1e-6
                )
    finally:
        server.stop()
    log = server.log_file.read_text(errors="replace")
    assert UNREAD not in log, log[-3000:]
