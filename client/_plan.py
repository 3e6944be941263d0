"""How the protocol core asks for I/O without doing any: plans, and the operations built from them.

A *plan* is a generator that yields actions (``Call`` an RPC, ``Sleep``, or a multi-stream's actions) and gets
back what each one produced, or has the grpc error it raised thrown in; its return value is the operation's
result. Everything that is not I/O (the requests, the retry decisions, what an answer means) lives in the plan,
written once; the sync shell performs the actions by blocking, the asyncio shell by awaiting.

An ``Operation`` is a plan-returning method that the shells expose as a public method: on a ``Blocking``
object (the sync shell's classes) it runs the plan to completion; on an ``Awaiting`` one (asyncio) it returns
a coroutine that does. Each public operation is therefore declared once, with one signature and docstring.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Generator
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Concatenate, Generic, ParamSpec, TypeAlias, TypeVar, overload

import grpc

_P = ParamSpec("_P")
_R = TypeVar("_R")

Metadata: TypeAlias = tuple[tuple[str, str], ...]
"""Call metadata as grpc takes it, keys lower-cased."""

DEFAULT: Any = object()
"""A timeout argument meaning "the client's timeout", distinct from an explicit None (no deadline)."""


class Action:
    """Something a plan asks its shell to do."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class Call(Action):
    """One attempt of a unary call; the shell answers with the response or throws in the ``grpc.RpcError``.

    ``method`` is an RnnServe method's name (the shell's stub has it), or a callable the shell handed in itself.
    """

    method: str | Callable[..., Any]
    request: Any
    timeout: float | None
    metadata: Metadata | None


@dataclass(frozen=True, slots=True)
class Sleep(Action):
    """Wait ``seconds`` (a backoff before a retry); the shell answers None."""

    seconds: float


Plan: TypeAlias = Generator[Action, Any, _R]


class Runner(Generic[_R]):
    """Steps a shell through a plan: ``action`` is what to do next, None once the plan has returned (its
    value is then ``result``). The shell performs the action inside ``with runner:`` and reports its answer
    with ``resume``; a grpc error the action raises is thrown into the plan on leaving the ``with``. An error
    the plan raises comes out of either."""

    __slots__ = ("_plan", "action", "result")

    result: _R

    def __init__(self, plan: Plan[_R]) -> None:
        self._plan = plan
        self.action: Action | None = None
        self._advance(plan.send, None)

    def resume(self, answer: Any) -> None:
        self._advance(self._plan.send, answer)

    def __enter__(self) -> Runner[_R]:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> bool:
        if not isinstance(error, grpc.RpcError):
            return False
        self._advance(self._plan.throw, error)
        return True  # the plan has taken it

    def _advance(self, step: Callable[[Any], Action], value: Any) -> None:
        try:
            self.action = step(value)
        except StopIteration as done:
            self.action = None
            self.result = done.value


class Blocking:
    """Base of the sync shell's classes: their operations run to completion when called."""

    __slots__ = ()

    def _bind(self, op: Operation[_P, _R]) -> Callable[_P, _R]:
        raise NotImplementedError


class Awaiting:
    """Base of the asyncio shell's classes: their operations return a coroutine."""

    __slots__ = ()

    def _bind(self, op: Operation[_P, _R]) -> Callable[_P, Coroutine[Any, Any, _R]]:
        raise NotImplementedError


class Operation(Generic[_P, _R]):
    """A public method written once as a plan (see the module's docstring).

    ``turns``: calls of this operation on one object wait for each other (a session's steps are numbered
    from the steps acknowledged before them; a multi-stream's messages share one call). How they wait, a
    thread lock or an asyncio one, is the shell's business.
    """

    def __init__(self, plan: Callable[Concatenate[Any, _P], Plan[_R]], *, turns: bool = False) -> None:
        self.plan = plan
        self.turns = turns
        # For help(): the class attribute reads as the method it stands for.
        self.__name__ = plan.__name__
        self.__qualname__ = plan.__qualname__
        self.__doc__ = plan.__doc__
        self.__wrapped__ = plan

    @overload
    def __get__(self, obj: None, owner: type[Any]) -> Operation[_P, _R]: ...
    @overload
    def __get__(self, obj: Blocking, owner: type[Any]) -> Callable[_P, _R]: ...
    @overload
    def __get__(self, obj: Awaiting, owner: type[Any]) -> Callable[_P, Coroutine[Any, Any, _R]]: ...
    def __get__(self, obj: Any, owner: type[Any]) -> Any:
        if obj is None:
            return self
        return obj._bind(self)

    def __call__(self, obj: Blocking | Awaiting, /, *args: Any, **kwargs: Any) -> Any:
        """Called through the class, as a method can be: ``Client.list_models(client)``."""
        return obj._bind(self)(*args, **kwargs)


def operation(plan: Callable[Concatenate[Any, _P], Plan[_R]]) -> Operation[_P, _R]:
    """Expose ``plan`` as a public method of both shells."""
    return Operation(plan)


def in_turn(plan: Callable[Concatenate[Any, _P], Plan[_R]]) -> Operation[_P, _R]:
    """Expose ``plan`` as a public method whose calls on one object take turns."""
    return Operation(plan, turns=True)
