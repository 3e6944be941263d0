"""The client's protocol core without sockets: retry decisions, the backoff schedule, step numbering, session id
proposal and adoption, multi-stream resends and the stream-resume state machine, each driven by hand the way
the sync and asyncio shells drive them (the shells themselves run against real servers in test_client*.py,
test_exactly_once.py and test_store_faults.py)."""

from __future__ import annotations

from typing import Any

import grpc
import numpy as np
import pytest

from rnnserve.client import RnnServeError
from rnnserve.client._multi_stream import Cancel, Exchange, MultiStreamProtocol, Reopen
from rnnserve.client._plan import DEFAULT, Blocking, Call, Operation, Plan, Runner, Sleep
from rnnserve.client._protocol import ROUTING_HEADER, ClientProtocol, SessionProtocol
from rnnserve.client._retry import RETRYABLE, Attempts, RetryPolicy, retry_code
from rnnserve.client._stream import END, WAIT, StepRetry, StreamResume
from rnnserve.proto import rnnserve_pb2 as pb
from rnnserve.tensors import encode_map

Code = grpc.StatusCode


class RpcFailure(grpc.RpcError):
    """What grpc raises for a failed call: a status and its details."""

    def __init__(self, code: grpc.StatusCode, details: str = "") -> None:
        super().__init__(details)
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class ScriptedClient(ClientProtocol[SessionProtocol], Blocking):
    """The core with no channel: tests step its plans themselves."""

    def _connect(self, credentials: Any, options: list[tuple[str, Any]]) -> None:
        self._channel = None

    def _new_session(self, response: pb.OpenSessionResponse) -> SessionProtocol:
        return SessionProtocol(self, response)


MODEL = pb.ModelInfo(
    name="acc", version=2, inputs=[pb.TensorSpec(name="x", dtype=pb.FLOAT32, shape=[2])], outputs=[], states=[]
)
X = np.array([1.0, 2.0], np.float32)


def session(steps: int = 0, retries: int = 5) -> SessionProtocol:
    client = ScriptedClient("nowhere:1", retries=retries, backoff=0.01, max_backoff=0.04, metadata={"K": "v"})
    return SessionProtocol(client, pb.OpenSessionResponse(session_id="s1", model=MODEL, steps=steps))


def fail(runner: Runner[Any], code: grpc.StatusCode, details: str = "") -> None:
    """Report the current action failing with ``code``, as a shell does."""
    with runner:
        raise RpcFailure(code, details)


def result(request_id: str, steps: int, code: grpc.StatusCode = Code.OK, message: str = "") -> pb.StepResult:
    out = pb.StepResult(session_id="s1", request_id=request_id, steps=steps, code=code.value[0], message=message)
    if code == Code.OK:
        encode_map({"y": np.full(2, steps, np.float32)}, out.outputs)
    return out


# ---- retry decisions and the backoff schedule ---------------------------------------------------------------


@pytest.mark.parametrize("code", list(grpc.StatusCode))
def test_only_unavailable_deadline_and_aborted_are_retried(code: grpc.StatusCode) -> None:
    policy = RetryPolicy(retries=2)
    retried = code in (Code.UNAVAILABLE, Code.DEADLINE_EXCEEDED, Code.ABORTED)
    assert (code in RETRYABLE) == retried
    assert policy.should_retry(code, 0) == policy.should_retry(code, 1) == retried
    assert not policy.should_retry(code, 2)  # the bound: consecutive failures
    assert not RetryPolicy(retries=0).should_retry(code, 0)


def test_broken_transports_count_as_unavailable() -> None:
    assert retry_code(RpcFailure(Code.INTERNAL, "Received RST_STREAM with error code 2")) == Code.UNAVAILABLE
    assert retry_code(RpcFailure(Code.INTERNAL, "Internal error from Core")) == Code.UNAVAILABLE
    assert retry_code(RpcFailure(Code.CANCELLED, "server shutting down")) == Code.UNAVAILABLE
    # The model itself failing is the server's answer: INTERNAL, not retried.
    assert retry_code(RpcFailure(Code.INTERNAL, "model 'm' failed: shape mismatch")) == Code.INTERNAL


def test_backoff_doubles_from_backoff_up_to_max_backoff_with_jitter() -> None:
    policy = RetryPolicy(retries=10, backoff=0.05, max_backoff=0.3)
    caps = [0.05, 0.1, 0.2, 0.3, 0.3, 0.3]
    for failures, cap in enumerate(caps):
        delays = {policy.delay(failures) for _ in range(200)}
        assert all(cap / 2 <= d <= cap for d in delays)
        assert len(delays) > 1  # jittered, so that many clients do not retry in step
    with pytest.raises(ValueError, match=">= 0"):
        RetryPolicy(retries=-1)


def test_attempts_bound_consecutive_failures_and_reset_on_success() -> None:
    attempts = Attempts(RetryPolicy(retries=2, backoff=0.01, max_backoff=0.01))
    assert 0.005 <= attempts.after(RpcFailure(Code.UNAVAILABLE)) <= 0.01
    attempts.succeeded()
    attempts.after(RpcFailure(Code.ABORTED))
    attempts.after(RpcFailure(Code.DEADLINE_EXCEEDED))
    with pytest.raises(RnnServeError) as info:
        attempts.after(RpcFailure(Code.UNAVAILABLE, "gone"))
    assert info.value.code == Code.UNAVAILABLE and info.value.message == "gone"
    with pytest.raises(RnnServeError) as info:
        Attempts(RetryPolicy()).after(RpcFailure(Code.UNAVAILABLE), allowed=False)
    assert info.value.code == Code.UNAVAILABLE


# ---- unary plans: retries, step numbering, session ids ------------------------------------------------------


def test_a_unary_call_is_retried_after_a_backoff_then_answered() -> None:
    client = ScriptedClient("nowhere:1", timeout=3.0, retries=2, backoff=0.01, max_backoff=0.01, token="t")
    runner = Runner(client._rpc("ListModels", pb.ListModelsRequest()))
    first = runner.action
    assert isinstance(first, Call) and first.method == "ListModels" and first.timeout == 3.0
    assert first.metadata == (("authorization", "Bearer t"),)
    for code in (Code.UNAVAILABLE, Code.DEADLINE_EXCEEDED):
        fail(runner, code)
        assert isinstance(runner.action, Sleep) and 0.005 <= runner.action.seconds <= 0.01
        runner.resume(None)
        assert runner.action is first  # the same request again
    with pytest.raises(RnnServeError) as info:
        fail(runner, Code.UNAVAILABLE, "still down")  # a third failure in a row: retries=2
    assert info.value.code == Code.UNAVAILABLE and info.value.message == "still down"


def test_unary_retries_end_with_the_error_and_refusals_are_not_retried() -> None:
    client = ScriptedClient("nowhere:1", retries=1, backoff=0.0)
    runner = Runner(client._rpc("GetModel", pb.GetModelRequest(name="m")))
    fail(runner, Code.ABORTED)
    runner.resume(None)
    with pytest.raises(RnnServeError) as info:
        fail(runner, Code.UNAVAILABLE, "no connection")
    assert info.value.code == Code.UNAVAILABLE and info.value.message == "no connection"
    for code in (Code.NOT_FOUND, Code.INVALID_ARGUMENT, Code.FAILED_PRECONDITION, Code.INTERNAL):
        runner = Runner(client._rpc("GetModel", pb.GetModelRequest(name="m")))
        with pytest.raises(RnnServeError) as info:
            fail(runner, code, "refused")
        assert info.value.code == code
    runner = Runner(client._rpc("LoadModel", pb.LoadModelRequest(name="m"), retry=False))
    with pytest.raises(RnnServeError):  # loads are never retried: one may still be building
        fail(runner, Code.DEADLINE_EXCEEDED)


# What grpc's channel says when nothing listens at the target (its words, as a sync or asyncio call raises them).
REFUSED = "failed to connect to all addresses; last error: UNKNOWN: ipv4:10.0.0.7:50051: Connection refused"


def test_a_call_that_reached_no_server_names_the_address_tried() -> None:
    client = ScriptedClient("models.internal:50051", retries=1, backoff=0.0)
    runner = Runner(client._rpc("ListModels", pb.ListModelsRequest()))
    fail(runner, Code.UNAVAILABLE, REFUSED)
    runner.resume(None)
    with pytest.raises(RnnServeError) as info:
        fail(runner, Code.UNAVAILABLE, REFUSED)
    assert info.value.code == Code.UNAVAILABLE
    assert info.value.message.startswith("no server answered at models.internal:50051: is `rnnserve serve` running")
    assert info.value.message.endswith(f"(grpc: {REFUSED})")
    # A stream that cannot reconnect says the same; a server's own UNAVAILABLE (e.g. its store) stays its words.
    stream = StreamResume(session(retries=0), window=1, outputs=None)
    with pytest.raises(RnnServeError, match=r"^UNAVAILABLE: no server answered at nowhere:1: "):
        stream.retry_after(RpcFailure(Code.UNAVAILABLE, REFUSED))
    runner = Runner(ScriptedClient("nowhere:1", retries=0)._rpc("GetStats", pb.StatsRequest()))
    with pytest.raises(RnnServeError) as info:
        fail(runner, Code.UNAVAILABLE, "session store unavailable")
    assert info.value.message == "session store unavailable"


def test_steps_are_numbered_from_the_acknowledged_ones_and_a_retry_keeps_the_index() -> None:
    s = session(steps=4)
    runner = Runner(s._step_plan(X, False, None, DEFAULT))
    call = runner.action
    assert isinstance(call, Call) and call.method == "Step" and call.request.step_index == 5
    assert (ROUTING_HEADER, "s1") in call.metadata and ("k", "v") in call.metadata
    fail(runner, Code.DEADLINE_EXCEEDED, "may or may not have been applied")  # outcome unknown: resend
    runner.resume(None)
    assert runner.action is call and call.request.step_index == 5
    answer = pb.StepResponse(session_id="s1", steps=5)
    encode_map({"y": X}, answer.outputs)
    runner.resume(answer)
    assert runner.action is None and s.steps == 5
    np.testing.assert_array_equal(runner.result, X)

    chunk = Runner(s._step_plan(np.stack([X, X, X]), True, None, DEFAULT))
    assert chunk.action.request.step_index == 6 and chunk.action.request.num_steps == 3
    chunk.resume(pb.StepResponse(session_id="s1", steps=8))
    assert s.steps == 8
    reset = Runner(SessionProtocol.reset.plan(s))
    reset.resume(pb.ResetSessionResponse())
    assert s.steps == 0 and Runner(s._step_plan(X, False, None, DEFAULT)).action.request.step_index == 1


def test_open_session_proposes_an_id_and_adopts_it_after_already_exists() -> None:
    client = ScriptedClient("nowhere:1", backoff=0.0)
    runner = Runner(ClientProtocol.open_session.plan(client, "acc"))
    call = runner.action
    proposed = call.request.session_id
    assert call.method == "OpenSession" and len(proposed) >= 20
    assert call.metadata == ((ROUTING_HEADER, proposed),)  # routed like the session's later calls
    fail(runner, Code.UNAVAILABLE)  # the answer was lost: did it land?
    runner.resume(None)
    assert runner.action is call
    fail(runner, Code.ALREADY_EXISTS, f"session id '{proposed}' is not available: choose another id")
    lookup = runner.action
    assert lookup.method == "GetState" and lookup.request.session_id == proposed
    assert lookup.metadata == ((ROUTING_HEADER, proposed),)
    runner.resume(pb.SessionState(session_id=proposed, model="acc", version=2, steps=0))
    assert runner.action.method == "GetModel" and runner.action.request.version == 2
    runner.resume(MODEL)
    s = runner.result
    assert isinstance(s, SessionProtocol) and s.id == proposed and s.model.name == "acc" and s.steps == 0

    other = Runner(ClientProtocol.open_session.plan(client, "acc"))
    assert other.action.request.session_id != proposed  # a fresh proposal each time
    with pytest.raises(RnnServeError) as info:
        fail(other, Code.NOT_FOUND, "model 'acc' not found")
    assert info.value.code == Code.NOT_FOUND


def test_operations_run_on_any_blocking_shell() -> None:
    class Answering(ScriptedClient):
        """A shell that answers every call from a table and records what it was asked."""

        def __init__(self, answers: dict[str, Any]) -> None:
            super().__init__("nowhere:1")
            self.answers, self.asked = answers, []

        def _bind(self, op: Operation[Any, Any]) -> Any:
            return lambda *args, **kwargs: self._run(op.plan(self, *args, **kwargs), op.turns)

        def _run(self, plan: Plan[Any], turns: bool) -> Any:
            runner = Runner(plan)
            while runner.action is not None:
                self.asked.append(runner.action.method)
                runner.resume(self.answers[runner.action.method])
            return runner.result

    shell = Answering({"ListModels": pb.ListModelsResponse(models=[MODEL]), "GetModel": MODEL})
    assert [m.name for m in shell.list_models()] == ["acc"]
    assert shell.model("acc").version == 2
    assert shell.asked == ["ListModels", "GetModel"]


# ---- multi-streams ------------------------------------------------------------------------------------------


def test_a_multi_stream_message_is_resent_on_a_new_stream_only_when_every_step_is_numbered() -> None:
    s = session(steps=2, retries=3)
    ms = MultiStreamProtocol(s._client)
    runner = Runner(MultiStreamProtocol.step.plan(ms, {s: X}))
    exchange = runner.action
    assert isinstance(exchange, Exchange) and exchange.request.steps[0].step_index == 3
    fail(runner, Code.UNAVAILABLE)
    assert isinstance(runner.action, Cancel)
    runner.resume(None)
    assert isinstance(runner.action, Sleep)
    runner.resume(None)
    assert isinstance(runner.action, Reopen)
    runner.resume(None)
    assert runner.action == exchange  # the same message, indexes included
    runner.resume(None)  # the server ended the stream: as UNAVAILABLE
    for _ in range(3):
        runner.resume(None)
    assert runner.action == exchange
    runner.resume(pb.StreamStepResponse(results=[result("0", 3)]))
    assert s.steps == 3 and runner.action is None

    by_id = Runner(MultiStreamProtocol.step.plan(ms, {"other": {"x": X}}))  # unnumbered: not resent
    fail(by_id, Code.UNAVAILABLE)
    assert isinstance(by_id.action, Cancel)
    with pytest.raises(RnnServeError) as info:
        by_id.resume(None)
    assert info.value.code == Code.UNAVAILABLE
    with pytest.raises(RuntimeError, match="closed"):
        Runner(MultiStreamProtocol.step.plan(ms, {s: X}))


# ---- the stream-resume state machine ----------------------------------------------------------------------


def fill(stream: StreamResume, n: int) -> None:
    """What the puller does: take inputs while the core wants them."""
    for _ in range(n):
        assert stream.claim_input()
        stream.add_input(stream.build(X))


def sent(stream: StreamResume, attempt: int) -> list[int]:
    """The step indexes ``attempt`` sends until it must wait (or end)."""
    indexes = []
    while not isinstance(request := stream.next_request(attempt), type(WAIT)):
        (step,) = request.steps
        assert step.request_id == str(step.step_index)
        indexes.append(step.step_index)
    return indexes


def test_the_window_bounds_steps_added_and_not_consumed() -> None:
    s = session(steps=10)
    stream = StreamResume(s, window=3, outputs=None)
    fill(stream, 3)
    assert not stream.claim_input()  # window full
    attempt = stream.open_attempt()
    assert sent(stream, attempt) == [11, 12, 13] and stream.next_request(attempt) is WAIT
    np.testing.assert_array_equal(stream.answer(result("11", 11)), [11, 11])
    assert s.steps == 11 and not stream.claim_input()  # answered, but the caller has not taken it yet
    stream.consumed()
    assert stream.claim_input() and not stream.claim_input()  # one puller at a time
    stream.end_input()
    assert stream.next_request(attempt) is END  # everything sent: half-close
    assert not stream.finished()
    stream.answer(result("12", 12))
    stream.answer(result("13", 13))
    assert stream.finished() and s.steps == 13


def test_a_broken_stream_resumes_from_the_oldest_unanswered_step() -> None:
    s = session(steps=0)
    stream = StreamResume(s, window=4, outputs=None)
    fill(stream, 4)
    first = stream.open_attempt()
    assert sent(stream, first) == [1, 2, 3, 4]
    stream.answer(result("1", 1))
    stream.consumed()
    assert 0 < stream.retry_after(RpcFailure(Code.UNAVAILABLE, "Socket closed")) <= 0.04
    second = stream.open_attempt()
    assert stream.next_request(first) is END  # superseded
    assert sent(stream, second) == [2, 3, 4]  # in order, with their indexes
    fill(stream, 1)  # a step added during the attempt is sent after them
    assert sent(stream, second) == [5]
    # The server had applied 2 and 3 before the break: it answers them from its replay cache, as any answer.
    for index in (2, 3, 4, 5):
        stream.answer(result(str(index), index))
    assert s.steps == 5


@pytest.mark.parametrize("code", [Code.UNAVAILABLE, Code.ABORTED, Code.DEADLINE_EXCEEDED])
def test_a_retryable_step_result_resends_that_step_with_its_index(code: grpc.StatusCode) -> None:
    s = session(steps=6)
    stream = StreamResume(s, window=3, outputs=None)
    fill(stream, 3)
    attempt = stream.open_attempt()
    assert sent(stream, attempt) == [7, 8, 9]
    stream.answer(result("7", 7))
    # e.g. DEADLINE_EXCEEDED: the session store did not confirm the write, the step may or may not be applied.
    with pytest.raises(StepRetry) as info:
        stream.answer(result("8", 0, code, "may or may not have been applied"))
    assert info.value.error.code == code and s.steps == 7
    stream.retry_after(info.value)
    again = stream.open_attempt()
    assert sent(stream, again) == [8, 9]  # step 8 again, index 8: applied at most once
    stream.answer(result("8", 8))  # the replayed (or first) answer
    stream.answer(result("9", 9))
    assert s.steps == 9


def test_resume_gives_up_after_retries_failures_in_a_row_counted_from_the_last_answer() -> None:
    s = session(steps=0, retries=2)
    stream = StreamResume(s, window=2, outputs=None)
    fill(stream, 2)
    stream.retry_after(RpcFailure(Code.UNAVAILABLE))
    stream.retry_after(None)  # the server ended the stream early: as UNAVAILABLE
    stream.answer(result("1", 1))  # an answer resets the count
    stream.retry_after(StepRetry(RnnServeError(Code.ABORTED, "moved")))
    stream.retry_after(RpcFailure(Code.UNAVAILABLE))
    with pytest.raises(RnnServeError) as info:
        stream.retry_after(None)
    assert info.value.code == Code.UNAVAILABLE and info.value.message == "the server ended the stream"
    assert info.value.session_id == "s1"
    with pytest.raises(RnnServeError) as info:
        StreamResume(session(), 1, None).retry_after(RpcFailure(Code.PERMISSION_DENIED, "no"))
    assert info.value.code == Code.PERMISSION_DENIED


def test_a_failed_or_mismatched_step_result_is_an_error() -> None:
    s = session(steps=0)
    stream = StreamResume(s, window=2, outputs=None)
    fill(stream, 2)
    with pytest.raises(RnnServeError) as info:
        stream.answer(result("1", 0, Code.INVALID_ARGUMENT, "input 'x': float32[5]"))
    assert info.value.code == Code.INVALID_ARGUMENT and info.value.session_id == "s1" and s.steps == 0
    with pytest.raises(RnnServeError, match="arrived where 1 was expected") as info:
        stream.answer(result("2", 2))
    assert info.value.code == Code.INTERNAL
    empty = StreamResume(session(), 1, None)
    with pytest.raises(RnnServeError, match="where nothing was expected"):
        empty.answer(result("1", 1))


def test_a_pull_in_progress_when_its_attempt_breaks_is_sent_by_the_next() -> None:
    stream = StreamResume(session(steps=0), window=2, outputs=None)
    first = stream.open_attempt()
    assert stream.next_request(first) is WAIT and stream.claim_input()  # the sender claims the pull
    second = stream.open_attempt()  # the attempt broke while the input was being pulled
    assert stream.next_request(second) is WAIT and not stream.claim_input()
    stream.add_input(stream.build(X))
    assert stream.next_request(first) is END and sent(stream, second) == [1]


def test_the_inputs_error_comes_after_the_steps_before_it() -> None:
    stream = StreamResume(session(steps=0), window=2, outputs=None)
    fill(stream, 1)
    assert stream.claim_input()
    stream.end_input(KeyError("sensor gone"))
    attempt = stream.open_attempt()
    assert sent(stream, attempt) == [1] and stream.next_request(attempt) is END
    stream.answer(result("1", 1))
    assert stream.finished()
    with pytest.raises(KeyError, match="sensor gone"):
        stream.raise_input_error()
    stream.close()
    assert stream.next_request(attempt) is END and not stream.claim_input()
