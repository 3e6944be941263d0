"""The blocking shell: Client, Session and MultiStream perform, on a grpc channel, the I/O that the protocol core
(``_protocol``, ``_stream``, ``_multi_stream``) asks for, blocking until each action is done."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, ParamSpec, Self, TypeVar

import grpc

from rnnserve.client import _convert
from rnnserve.client._multi_stream import Cancel, Exchange, MultiStreamProtocol, Reopen
from rnnserve.client._plan import Action, Blocking, Call, Operation, Plan, Runner, Sleep
from rnnserve.client._protocol import ClientProtocol, SessionProtocol
from rnnserve.client._stream import DEFAULT_WINDOW, END, WAIT, StepRetry, StreamResume, check_window
from rnnserve.proto import rnnserve_pb2 as pb
from rnnserve.proto import rnnserve_pb2_grpc as pb_grpc

_P = ParamSpec("_P")
_R = TypeVar("_R")


def _run(plan: Plan[_R], perform: Callable[[Action], Any]) -> _R:
    """Perform each action ``plan`` asks for, feeding back its answer or its grpc error, until it returns."""
    runner = Runner(plan)
    while (action := runner.action) is not None:
        with runner:  # a grpc error goes back into the plan
            runner.resume(perform(action))
    return runner.result


class _Shell(Blocking):
    """Operations of the sync shell's objects return when their plan is done."""

    __slots__ = ()

    def _bind(self, op: Operation[_P, _R]) -> Callable[_P, _R]:
        def run(*args: _P.args, **kwargs: _P.kwargs) -> _R:
            return self._run(op.plan(self, *args, **kwargs), op.turns)

        return run

    def _run(self, plan: Plan[_R], turns: bool) -> _R:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Client(ClientProtocol["Session"], _Shell):
    """A blocking connection to an rnnserve server.

    Args:
        address: ``host:port`` of the server.
        credentials: ``grpc.ChannelCredentials`` for TLS; None for a plaintext channel.
        timeout: deadline in seconds for each unary call (streams have none); None waits forever.
        max_message_bytes: send and receive limit of the channel (chunks of many steps are large).
        options: extra grpc channel options, applied after the message limits.
        metadata: ``(key, value)`` pairs or a mapping sent with every call (e.g. an auth token).
        token: sent as ``authorization: Bearer TOKEN`` with every call (servers run with auth tokens).
        retries: how many times in a row a call (or a stream, from its last answered step) is retried after
            UNAVAILABLE, DEADLINE_EXCEEDED or ABORTED; 0 turns retries off. Steps carry their session's step
            index, so a retried step is applied once (docs/durability.md, "Exactly-once steps and retries").
        backoff, max_backoff: the first wait before a retry in seconds, doubling up to ``max_backoff``
            (with jitter).
    """

    def _connect(self, credentials: grpc.ChannelCredentials | None, options: list[tuple[str, Any]]) -> None:
        if credentials is None:
            self._channel = grpc.insecure_channel(self.address, options=options)
        else:
            self._channel = grpc.secure_channel(self.address, credentials, options=options)
        self._stub = pb_grpc.RnnServeStub(self._channel)

    def _new_session(self, response: pb.OpenSessionResponse) -> Session:
        return Session(self, response)

    def _run(self, plan: Plan[_R], turns: bool = False) -> _R:
        return _run(plan, self._perform)

    def _perform(self, action: Action) -> Any:
        if isinstance(action, Sleep):
            return time.sleep(action.seconds)
        assert isinstance(action, Call)
        method = getattr(self._stub, action.method) if isinstance(action.method, str) else action.method
        return method(action.request, timeout=action.timeout, metadata=action.metadata)

    @property
    def channel(self) -> grpc.Channel:
        """The underlying grpc channel (shared by all sessions of this client)."""
        return self._channel

    def close(self) -> None:
        """Close the channel. Open sessions stay on the server until closed elsewhere or expired."""
        self._channel.close()

    session = ClientProtocol["Session"].open_session  # reads best as ``with client.session("m") as s:``

    def multi_stream(self) -> MultiStream:
        """A stream carrying steps of many sessions per message (see MultiStream)."""
        return MultiStream(self)


class Session(SessionProtocol, _Shell):
    __doc__ = SessionProtocol.__doc__

    _client: Client

    def __init__(self, client: Client, response: pb.OpenSessionResponse) -> None:
        super().__init__(client, response)
        self._stepping = threading.Lock()

    def _run(self, plan: Plan[_R], turns: bool) -> _R:
        if not turns:
            return self._client._run(plan)
        with self._stepping:
            return self._client._run(plan)

    def stream(
        self, xs: Iterable[_convert.Inputs], *, window: int = DEFAULT_WINDOW, outputs: Sequence[str] | None = None
    ) -> Iterator[_convert.Outputs]:
        """Stream timesteps over one StreamStep call, yielding each step's outputs in order.

        At most ``window`` steps are in flight (sent but not yet consumed by the caller): the next item of
        ``xs`` is only pulled once a slot is free, so ``window=1`` is strict lock-step (e.g. to feed each
        output back as the next input) and larger windows hide the network round trip. ``xs`` is
        iterated on a grpc thread; an exception it raises is re-raised here after the outputs of the
        steps before it. A failed step raises RnnServeError and cancels the stream; the steps sent after
        it are refused, since they carry the indexes of the steps after it (``s.steps`` says where the
        session stands). A broken stream (UNAVAILABLE), or a step that failed with a status a retry may
        change (UNAVAILABLE, DEADLINE_EXCEEDED: e.g. its session-store write was not confirmed; ABORTED: the
        session moved to another replica), is reopened and resumes from the last answered step: the
        unanswered ones are sent again with their indexes, and those the server had applied come back from
        its replay cache (``Client(retries=)`` bounds the reconnections in a row).
        """
        check_window(window)
        return self._stream(iter(xs), window, outputs)

    def _stream(self, xs: Iterator[Any], window: int, outputs: Sequence[str] | None) -> Iterator[_convert.Outputs]:
        box = _Outbox(StreamResume(self, window, outputs), xs)
        try:
            while True:
                call = self._client._stub.StreamStep(box.requests(), metadata=self._metadata)
                failure: grpc.RpcError | StepRetry | None = None
                try:
                    for response in call:
                        for result in response.results:
                            yield box.answer(result)
                            box.consumed()
                except (grpc.RpcError, StepRetry) as exc:
                    failure = exc
                finally:
                    call.cancel()  # a no-op once finished; stops the server's work when the caller stops early
                if failure is None and box.finished():
                    break
                time.sleep(box.retry_after(failure))
        finally:
            box.close()
        box.raise_input_error()


class _Outbox:
    """A stream's ``StreamResume`` behind one lock, shared by the caller's thread (reading the answers) and
    grpc's threads (iterating each attempt's requests, which also pull ``xs``: so a slow ``xs`` delays no
    answer). A pull in progress when its attempt breaks books its step for the next attempt."""

    def __init__(self, core: StreamResume, xs: Iterator[Any]) -> None:
        self._core = core
        self._xs = xs
        self._cond = threading.Condition()

    def requests(self) -> Iterator[pb.StreamStepRequest]:
        """A new attempt's requests; the previous attempt's iterator ends."""
        with self._cond:
            attempt = self._core.open_attempt()
            self._cond.notify_all()
        return self._requests(attempt)

    def _requests(self, attempt: int) -> Iterator[pb.StreamStepRequest]:
        core = self._core
        while True:
            with self._cond:
                while (request := core.next_request(attempt)) is WAIT and not core.claim_input():
                    self._cond.wait()
            if request is END:
                return
            if request is WAIT:  # this thread claimed the pull
                self._pull()
            else:
                yield request

    def _pull(self) -> None:
        core = self._core
        try:
            message = core.build(next(self._xs))  # outside the lock: the claimant alone pulls and builds
        except StopIteration:
            message, error = None, None
        except Exception as exc:
            message, error = None, exc
        with self._cond:
            if message is None:
                core.end_input(error)
            else:
                core.add_input(message)
            self._cond.notify_all()

    def answer(self, result: pb.StepResult) -> _convert.Outputs:
        with self._cond:
            return self._core.answer(result)

    def consumed(self) -> None:
        with self._cond:
            self._core.consumed()
            self._cond.notify_all()

    def finished(self) -> bool:
        with self._cond:
            return self._core.finished()

    def retry_after(self, failure: grpc.RpcError | StepRetry | None) -> float:
        return self._core.retry_after(failure)  # the reader's own state: no lock

    def close(self) -> None:
        with self._cond:
            self._core.close()
            self._cond.notify_all()

    def raise_input_error(self) -> None:
        self._core.raise_input_error()


class MultiStream(MultiStreamProtocol, _Shell):
    __doc__ = MultiStreamProtocol.__doc__

    _client: Client

    def __init__(self, client: Client) -> None:
        super().__init__(client)
        self._lock = threading.Lock()
        self._open()

    def _open(self) -> None:
        self._requests: queue.SimpleQueue[pb.StreamStepRequest | None] = queue.SimpleQueue()
        self._call = self._client._stub.StreamStep(_until_none(self._requests), metadata=self._client._metadata)

    def _run(self, plan: Plan[_R], turns: bool) -> _R:
        with self._lock:  # every operation uses the one call
            return _run(plan, self._perform)

    def _perform(self, action: Action) -> Any:
        if isinstance(action, Exchange):
            self._requests.put(action.request)
            return next(self._call, None)
        if isinstance(action, Cancel):
            self._requests.put(None)
            return self._call.cancel()
        if isinstance(action, Reopen):
            return self._open()
        assert isinstance(action, Sleep)
        return time.sleep(action.seconds)

    def close(self) -> None:
        """Half-close the stream and wait for the server to end it."""
        with self._lock:
            failed = self._closing()
            self._requests.put(None)  # ends the request iterator grpc's thread is blocked in
            if failed:
                self._call.cancel()
                return
            try:
                for _ in self._call:
                    pass
            except grpc.RpcError:
                pass  # the stream already failed; that was reported by step()


def _until_none(requests: queue.SimpleQueue[pb.StreamStepRequest | None]) -> Iterator[pb.StreamStepRequest]:
    while (request := requests.get()) is not None:
        yield request
