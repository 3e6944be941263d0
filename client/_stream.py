"""The state machine of ``Session.stream`` across reconnections: what to send, in which order, what each answer
is, and when to give up. No I/O: the shells pull the caller's inputs, write and read the calls, and sleep.

A stream's steps are numbered from the session's next step index. Each one is kept, from the moment it is
built until its answer is read, in order: an attempt (one StreamStep call) sends them all from the oldest
unanswered one, so a broken stream, or a step whose result is retryable, resumes where the answers stopped;
a resent step the server had applied comes back from its replay cache, since it carries the same index.
"""

from __future__ import annotations

import enum
from collections import deque
from typing import TYPE_CHECKING, Final

import grpc

from rnnserve.client import _convert
from rnnserve.client._errors import RnnServeError, status_code
from rnnserve.client._retry import RETRYABLE, Failure
from rnnserve.proto import rnnserve_pb2 as pb

if TYPE_CHECKING:
    from collections.abc import Sequence

    from rnnserve.client._protocol import SessionProtocol

# Steps of one session in flight on a stream: enough to hide the network round trip behind the server's
# batching delay, small enough that a failed step has few later steps already applied behind it.
DEFAULT_WINDOW = 8


def check_window(window: int) -> int:
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    return window


class StepRetry(Exception):
    """A stream step failed with a status a retry may change: the stream is reopened and resumes at that step."""

    def __init__(self, error: RnnServeError) -> None:
        super().__init__(str(error))
        self.error = error


def check_resumable(result: pb.StepResult) -> None:
    """Raise StepRetry when a stream result failed with a status the clients retry (``_retry.RETRYABLE``: the
    session moved to another replica, the session store was down, the step's outcome is unknown). Checked
    before the result is paired with its step, so the stream resumes from that step as from a broken stream,
    and the step's index applies it at most once."""
    if result.code and status_code(result.code) in RETRYABLE:
        try:
            _convert.check_result(result)
        except RnnServeError as err:
            raise StepRetry(err) from None


class Signal(enum.Enum):
    """What ``next_request`` answers instead of a message."""

    WAIT = "nothing to send yet: wait until a step is added, or input is wanted (claim_input)"
    END = "this attempt sends no more: half-close it (every step sent, the input ended), or it was superseded"


WAIT: Final = Signal.WAIT
END: Final = Signal.END


class StreamResume:
    """One ``Session.stream``: its steps from the caller's input to their answers, across attempts.

    Three roles drive it, in whatever threads or tasks a shell gives them (the sync shell calls it under one
    lock; asyncio needs none): the *puller* takes the caller's inputs when ``claim_input`` says so and hands
    each to ``add_input`` (or ``end_input``); the *sender* of each attempt writes what ``next_request`` gives;
    the *reader* hands each result to ``answer`` and, after the attempt ends, asks ``finished`` and
    ``retry_after``. A window bounds the steps added and not yet ``consumed`` by the caller, so
    ``window=1`` is lock-step with the caller.
    """

    def __init__(self, session: SessionProtocol, window: int, outputs: Sequence[str] | None) -> None:
        self._session = session
        self._window = check_window(window)
        self._outputs = outputs
        self._attempts = session._client._attempts()
        self._next_index = session.steps + 1
        # Sent (or built to be sent) and not answered, oldest first, each in the message that carries it.
        self._unanswered: deque[pb.StreamStepRequest] = deque()
        self._answered = 0  # position (in the stream's steps) of _unanswered[0]
        self._in_flight = 0  # added and not consumed by the caller: what the window bounds
        self._pulling = False
        self._input_ended = False
        self._attempt = 0
        self._next_to_send = 0  # position the current attempt sends next
        self._closed = False
        self.input_error: Exception | None = None
        """What the caller's iterable raised: re-raised after the outputs of the steps before it."""

    # -- the puller ----------------------------------------------------------------------------------

    def claim_input(self) -> bool:
        """Whether the caller's input should be pulled now. True claims the pull, so one puller pulls at a
        time, until ``add_input`` or ``end_input``."""
        if self._pulling or self._input_ended or self._closed or self._in_flight >= self._window:
            return False
        self._pulling = True
        return True

    def build(self, x: _convert.Inputs) -> pb.StreamStepRequest:
        """The message for input ``x``, numbered as the next step. Only the claimant of the pull calls it, so
        a shell may build (encode the arrays) outside its lock."""
        index = self._next_index
        message = pb.StreamStepRequest()
        _convert.fill_step(
            message.steps.add(),
            self._session.id,
            _convert.named_inputs(x, self._session.model),
            outputs=self._outputs,
            request_id=str(index),
            step_index=index,
        )
        return message

    def add_input(self, message: pb.StreamStepRequest) -> None:
        """Book a built step: from now on every attempt sends it until it is answered."""
        self._unanswered.append(message)
        self._next_index += 1
        self._in_flight += 1
        self._pulling = False

    def end_input(self, error: Exception | None = None) -> None:
        """The caller's input is exhausted, or raised ``error``: no more steps."""
        self._input_ended = True
        self._pulling = False
        self.input_error = error

    # -- the sender ----------------------------------------------------------------------------------

    def open_attempt(self) -> int:
        """Start an attempt: it sends from the oldest unanswered step, and the previous attempt ends."""
        self._attempt += 1
        self._next_to_send = self._answered
        return self._attempt

    def next_request(self, attempt: int) -> pb.StreamStepRequest | Signal:
        """The next message ``attempt`` sends, in step order; WAIT or END (see those)."""
        if self._closed or attempt != self._attempt:
            return END
        offset = self._next_to_send - self._answered
        if offset < len(self._unanswered):
            self._next_to_send += 1
            return self._unanswered[offset]
        # Once the input has ended, the half-close still gets every step sent answered.
        return END if self._input_ended else WAIT

    # -- the reader ----------------------------------------------------------------------------------

    def answer(self, result: pb.StepResult) -> _convert.Outputs:
        """The outputs a result carries, checked against the step it answers (the oldest unanswered).

        Raises StepRetry when the step failed with a retryable status (it stays unanswered, to be resent),
        and RnnServeError when it failed otherwise: the steps sent after it are refused, since they carry
        the indexes of the steps after it.
        """
        check_resumable(result)
        _convert.check_result(result)
        session = self._session
        if not self._unanswered:
            expected = "nothing"
        else:
            expected = self._unanswered[0].steps[0].request_id
            if not result.request_id or result.request_id == expected:
                self._unanswered.popleft()
                self._answered += 1
                self._attempts.succeeded()
                session.steps = result.steps
                return _convert.outputs(result.outputs)
        # The proto promises results in request order; a mismatch would silently pair wrong outputs.
        raise RnnServeError(
            grpc.StatusCode.INTERNAL,
            f"stream result for request {result.request_id} arrived where {expected} was expected",
            session_id=session.id,
        )

    def consumed(self) -> None:
        """The caller took an output: a window slot is free."""
        self._in_flight -= 1

    def finished(self) -> bool:
        """Every step is answered and the input has ended."""
        return self._input_ended and not self._unanswered

    def retry_after(self, failure: Failure | StepRetry | None) -> float:
        """Seconds to wait before the next attempt, after one that ended by ``failure`` (a grpc error, a
        retryable step result, or None: the server ended the stream before answering every step); raises the
        error when it is not retried (``Client(retries=)`` bounds failed attempts since the last answer)."""
        if failure is None:
            failure = RnnServeError(
                grpc.StatusCode.UNAVAILABLE, "the server ended the stream", session_id=self._session.id
            )
        elif isinstance(failure, StepRetry):
            failure = failure.error
        return self._attempts.after(failure)

    def close(self) -> None:
        """The stream is over (done, failed, or the caller stopped): senders end, no more input is wanted."""
        self._closed = True

    def raise_input_error(self) -> None:
        """After the last output: re-raise what the caller's input raised, if anything."""
        if self.input_error is not None:
            raise self.input_error
