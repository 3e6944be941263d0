"""The data plane: every operation the transports offer, on numpy arrays and domain errors (no grpc here)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from rnnserve.server.core.session import Session
from rnnserve.server.core.sessions import SessionManager
from rnnserve.server.core.work import ControlJob, JobGroup, StepJob, answer, fingerprint
from rnnserve.server.durability import snapshot as snapshots
from rnnserve.server.durability.persistence import Persistence
from rnnserve.server.durability.store import StoreUnavailable
from rnnserve.server.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    SessionEnded,
    SessionIdUnavailable,
    SessionMoved,
)
from rnnserve.server.limits import Limits
from rnnserve.server.models.admin import ModelAdmin, UnloadResult
from rnnserve.server.models.model import LoadedModel
from rnnserve.server.models.predict import Predictor, PredictRequest, PredictResult, refuse_sessions
from rnnserve.server.models.repository import FailedModel, ModelRepository
from rnnserve.server.principal import current_principal

SESSION_ID = re.compile(r"[A-Za-z0-9_-]{16,128}")
"""A client-chosen session id: long enough to be unguessable when random, short enough for a header."""


@dataclass
class SessionStateView:
    session_id: str
    model: str
    version: int
    steps: int
    state: dict[str, np.ndarray]
    snapshot: bytes


class DataPlane:
    def __init__(
        self,
        repository: ModelRepository,
        sessions: SessionManager,
        admin: ModelAdmin,
        persistence: Persistence,
        limits: Limits,
        predictor: Predictor,
        *,
        max_pending_steps: int,
        replay_window: int = 8,
    ):
        self.repository = repository
        self.sessions = sessions
        self.max_pending_steps = max_pending_steps
        self.replay_window = replay_window  # applied indexed steps kept per session to answer retries
        self.limits = limits
        self.admin = admin
        self.predictor = predictor
        # Durable sessions (server/durability/persistence.py): every model the repository builds writes through it too.
        self.persistence = persistence

    # ---- models -----------------------------------------------------------------------------------------
    def models(self, name: str = "") -> list[LoadedModel]:
        return [m for key, m in sorted(self.repository.models.items()) if not name or key[0] == name]

    def model(self, name: str, version: int = 0) -> LoadedModel:
        return self.repository.get(name, version)

    async def load_model(self, name: str, version: int = 0) -> list[LoadedModel | FailedModel]:
        return await self.admin.load(name, version)

    async def unload_model(self, name: str, version: int = 0, *, force: bool = False) -> UnloadResult:
        return await self.admin.unload(name, version, force=force)

    # ---- sessions ---------------------------------------------------------------------------------------
    def open_session(
        self,
        model_name: str,
        version: int,
        initial_state: Mapping[str, np.ndarray],
        snapshot: bytes,
        parameters: Mapping[str, np.ndarray] | None = None,
        owner: str | None = None,
        session_id: str = "",
        allow_other_version: bool = False,
    ) -> Session:
        """``owner``: the caller's principal (or host, for the per-client limit); see SessionManager.open.
        Unset, it is the current principal, so every API that opens sessions (KServe sequences too) binds them.
        ``session_id``: the id the client chose (empty: a random one), in the caller's own namespace of ids
        (server/core/sessions.py): only the caller's own session of that id, here or (for a durable model, refused
        by its store write in ``opened``) at another replica, makes it unavailable. A ``snapshot`` opens on its
        own model and version (``model_name``/``version`` may only name those), or with ``allow_other_version``
        on the given or newest version of its model."""
        if owner is None:
            owner = current_principal()
        if session_id:
            if not SESSION_ID.fullmatch(session_id):
                raise InvalidArgument(
                    f"session_id {session_id[:140]!r} is not 16 to 128 characters of [A-Za-z0-9_-]; leave it empty "
                    "to have the server pick one"
                )
            if self.sessions.known(session_id):
                raise SessionIdUnavailable(session_id)
        parameters = parameters or {}
        if snapshot:
            if initial_state or parameters:
                raise InvalidArgument("a snapshot carries the state and parameters: give it alone")
            snap = snapshots.decode(snapshot)
            name = model_name or snap.model
            snapshots.check_target(snap, name, version or snap.version, allow_other_version=allow_other_version)
            model = self.repository.get(name, version or (0 if allow_other_version else snap.version))
            refuse_sessions(model)
            # A snapshot holds the session's parameters beside its state, under their own names.
            param_names = {p.name for p in model.manifest.parameters}
            state = model.check_state({k: v for k, v in snap.state.items() if k not in param_names}, partial=False)
            params = model.check_parameters({k: v for k, v in snap.state.items() if k in param_names})
            return self.sessions.open(model, state, snap.steps, params, owner, session_id=session_id or None)
        model = self.repository.get(model_name, version)
        refuse_sessions(model)
        given = model.check_state(initial_state, partial=True) if initial_state else None
        return self.sessions.open(
            model, given, 0, model.check_parameters(parameters), owner, session_id=session_id or None
        )

    def close_session(self, session_id: str) -> None:
        self.sessions.close(session_id)

    async def _control(self, session: Session, fn, steps: int | None = None):
        """Queue ``fn`` between the session's steps; ``steps``: its step count once ``fn`` ran (None: as is)."""
        future = asyncio.get_running_loop().create_future()
        self._batcher(session).enqueue(session, ControlJob(fn, future, steps))
        if steps is not None:
            session.renumber(steps)
        return await future

    def _batcher(self, session: Session):
        return self._batcher_of(session.model)

    @staticmethod
    def _batcher_of(model: LoadedModel):
        assert model.batcher is not None, "model not started"
        return model.batcher

    async def reset_session(self, session_id: str, state: Mapping[str, np.ndarray]) -> None:
        await self._restored(session_id)
        session = self.sessions.get(session_id)
        values = session.model.check_state(state, partial=True) if state else session.model.initial_state

        def reset() -> None:
            session.model.slab.write(session.slot, values)
            session.steps = 0
            session.forget_replay()

        await self._control_durable(session, reset, 0)

    async def get_state(self, session_id: str) -> SessionStateView:
        await self._restored(session_id)
        session = self.sessions.get(session_id)
        if await self.persistence.stale(session):
            # Replicas share the store and this copy is behind it (the session moved and came back): a read
            # (a snapshot) must not hand out an old state. Steps need no such check: their write is refused.
            self.persistence.moved(session)
            await self._restored(session_id)
            session = self.sessions.get(session_id)
        model = session.model

        def read() -> SessionStateView:
            row = model.slab.read(session.slot)
            state = model.state_dict(row)
            snap = snapshots.Snapshot(model.name, model.version, session.steps, {**state, **model.parameter_dict(row)})
            return SessionStateView(session.id, model.name, model.version, session.steps, state, snapshots.encode(snap))

        return await self._control(session, read)

    async def set_state(
        self, session_id: str, state: Mapping[str, np.ndarray], snapshot: bytes, allow_other_version: bool = False
    ) -> None:
        await self._restored(session_id)
        session = self.sessions.get(session_id)
        model = session.model
        if state and snapshot:
            raise InvalidArgument("give either state or snapshot, not both")
        steps: int | None = None
        if snapshot:
            snap = snapshots.decode(snapshot)
            snapshots.check_target(snap, model.name, model.version, allow_other_version=allow_other_version)
            param_names = {p.name for p in model.manifest.parameters}
            own = {k: v for k, v in snap.state.items() if k not in param_names}
            given = model.state_dict(model.check_state(own, partial=False))
            steps = snap.steps
        else:
            model.check_state(state, partial=True)
            given = dict(state)

        def write() -> None:
            # States not given keep their current value.
            current = model.slab.read(session.slot)
            merged = [given.get(s.name, c) for s, c in zip(model.state_specs, current, strict=False)]
            model.slab.write(session.slot, merged)
            if steps is not None:
                session.steps = steps
                session.forget_replay()

        await self._control_durable(session, write, steps)

    async def _control_durable(self, session: Session, fn, steps: int | None = None) -> None:
        """``_control``; for a durable model the changed session is also written to the session store (in
        order with its step writes) before the call answers."""
        persistence = self.persistence

        def apply():
            fn()
            return persistence.write_now(session) if persistence.durable(session) else None

        written = await self._control(session, apply, steps)
        if written is not None:
            try:
                await written
            except SessionMoved:
                self.persistence.moved(session)  # the change above was made to a stale copy: drop it
                raise

    # ---- durable sessions (server/durability/persistence.py) --------------------------------------------------------
    def restore_missing(self, session_ids: Sequence[str], step_indices: Sequence[int] = ()) -> Awaitable[None] | None:
        """Sessions this server does not hold may be in the session store (the server restarted, or the gateway
        sent the session here): an awaitable that restores those it has, or None when there is nothing to do
        (no await on the hot path). ``step_indices`` (one per id, 0: none) also catch a copy here that is
        behind the store: a step numbered past the copy's next one, on a shared store, means the session may
        have moved on elsewhere, so the store is asked, and a stale copy is replaced by the stored session."""
        missing = [sid for sid in session_ids if sid and not self.sessions.known(sid)]
        behind: list[Session] = []
        if step_indices and self.persistence.store.durable:
            for sid, index in zip(session_ids, step_indices, strict=False):
                session = self.sessions.peek(sid)
                if session is not None and index > session.next_index and self.persistence.durable(session):
                    behind.append(session)
        if not behind:
            return (
                self.persistence.restore(missing, self.sessions, self.repository, self.replay_window)
                if missing
                else None
            )
        return self._catch_up(missing, behind)

    async def _catch_up(self, missing: list[str], behind: list[Session]) -> None:
        for session in behind:
            if await self.persistence.stale(session):
                self.persistence.moved(session)
                missing.append(session.id)
        if missing:
            await self.persistence.restore(missing, self.sessions, self.repository, self.replay_window)

    async def _restored(self, session_id: str) -> None:
        if (pending := self.restore_missing((session_id,))) is not None:
            await pending

    async def opened(self, session: Session) -> None:
        """After OpenSession: a durable model's new session is in the store before the call answers. A store
        failure closes it again and raises UNAVAILABLE."""
        try:
            await self.persistence.opened(session)
        except AlreadyExists:
            self.persistence.disown(session)  # another session's record: closing this one must not delete it
            self.sessions.close(session.id)
            raise
        except StoreUnavailable:
            self.sessions.close(session.id)
            raise

    # ---- steps ------------------------------------------------------------------------------------------
    def submit_step(
        self,
        session: Session,
        inputs: Mapping[str, np.ndarray],
        num_steps: int,
        step_index: int = 0,
        *,
        keep: bool = False,
    ) -> tuple[LoadedModel, asyncio.Future]:
        """Queue one step (or chunk) of ``session``. Returns its model and a future for its ``StepOutcome``.

        ``inputs`` are the step's as the model's checks passed them (server/core/validation.py): each
        transport's codec runs those checks while it decodes a step. ``keep``: the step applies even if its
        caller stops waiting (a stream's).

        Everything else that can be refused is refused here, before the step is queued: a refused step never
        reaches the batcher and so never touches the session's state. A ``step_index`` repeating an earlier
        step gets that step's result instead (server/core/session.py).
        """
        model = session.model
        print_ = 0
        if step_index:
            print_ = fingerprint(inputs)
            earlier = session.admit(step_index, num_steps, print_)
            if earlier is not None:
                return model, answer(earlier)
        if len(session.pending) >= self.max_pending_steps:
            raise ResourceExhausted(
                f"session '{session.id}' already has {len(session.pending)} steps queued (limit "
                f"{self.max_pending_steps}); wait for responses before sending more"
            )
        batcher = self._batcher(session)
        self.limits.check_queue(batcher.queued_steps, num_steps or 1, model.key)
        future = asyncio.get_running_loop().create_future()
        batcher.enqueue(session, StepJob(inputs, num_steps, future, None, 0, step_index, print_, keep))
        session.queued(num_steps, step_index, self.replay_window)
        return model, future

    def check_room(self, model: LoadedModel, steps: int = 1) -> None:
        """Refuse ``steps`` more steps when the model's queue has no room for them (--max-queued-steps). A
        caller about to replace a session (a KServe START on a live sequence) asks first, so a refused step
        leaves the old session as it was."""
        self.limits.check_queue(self._batcher_of(model).queued_steps, steps, model.key)

    def submit_batch(
        self,
        session_ids: Sequence[str],
        inputs: Mapping[str, np.ndarray],
        step_indices: Sequence[int] = (),
        outputs: Sequence[str] = (),
    ) -> tuple[LoadedModel | None, asyncio.Future]:
        """Validate and queue one timestep for each of many sessions of one model (a StepBatch).

        Inputs are stacked, one row per session id, and are decoded and checked once for the whole message.
        A row whose session is unknown, on another model, over its queue limit, or whose input holds NaN/Inf
        fails alone; a malformed stacked tensor fails the whole message. The future gives a ``JobGroup``.
        ``step_indices`` (empty, or one per row; 0: unchecked) are admitted row by row, in order.
        """
        n = len(session_ids)
        if n == 0:
            raise InvalidArgument("a StepBatch needs at least one session id")
        if step_indices and len(step_indices) != n:
            raise InvalidArgument(f"a StepBatch has {n} session ids but {len(step_indices)} step_indices")
        future = asyncio.get_running_loop().create_future()
        errors: dict[int, Exception] = {}
        sessions: list[Session | None] = [None] * n
        model: LoadedModel | None = None
        for i, sid in enumerate(session_ids):
            try:
                session = self.sessions.get(sid)
            except (NotFound, SessionEnded) as exc:
                errors[i] = exc
                continue
            if model is None:
                model = session.model
            elif session.model is not model:
                errors[i] = InvalidArgument(
                    f"session '{sid}' is on model {session.model.key}, not {model.key}: "
                    "a StepBatch holds sessions of one model"
                )
                continue
            if len(session.pending) >= self.max_pending_steps:
                errors[i] = ResourceExhausted(
                    f"session '{sid}' already has {len(session.pending)} steps queued (limit {self.max_pending_steps})"
                )
                continue
            sessions[i] = session
        group = JobGroup(n, future)
        if model is None:
            for i, error in errors.items():
                group.finish(i, None, 0, error)
            return None, future
        self.limits.check_queue(self._batcher_of(model).queued_steps, n, model.key)
        checked = model.checks.inputs(inputs, n, lead="sessions", finite=False)
        model.checks.outputs(outputs)
        for row, name in model.checks.nonfinite_rows(checked).items():
            where = f", row {row} (session '{session_ids[row]}'),"
            errors.setdefault(row, model.checks.nonfinite("input", name, where))
        for i, error in errors.items():
            group.finish(i, None, 0, error)
        batcher = self._batcher_of(model)
        if not step_indices and len(set(session_ids)) == n:
            # Unnumbered rows of distinct sessions (the common columnar message): queued together. A row's job
            # reads its inputs from the message's stacked tensors (StepJob.step_input).
            rows = [(i, s) for i, s in enumerate(sessions) if s is not None and i not in errors]
            batcher.enqueue_rows([s for _, s in rows], [StepJob(checked, 0, None, group, i) for i, _ in rows])
            for _, queued in rows:
                queued.queued_step()
            return model, future
        for i, row_session in enumerate(sessions):
            if row_session is not None and i not in errors:
                index = step_indices[i] if step_indices else 0
                print_ = 0
                if index:
                    print_ = fingerprint({name: value[i] for name, value in checked.items()})
                    try:
                        earlier = row_session.admit(index, 0, print_)
                    except FailedPrecondition as exc:
                        group.finish(i, None, 0, exc)
                        continue
                    if earlier is not None:
                        group.answer_row(i, earlier)
                        continue
                batcher.enqueue(row_session, StepJob(checked, 0, None, group, i, index, print_))
                row_session.queued(0, index, self.replay_window)
        return model, future

    # ---- whole sequences --------------------------------------------------------------------------------
    async def predict(self, model_name: str, version: int, request: PredictRequest) -> PredictResult:
        """Run a batch of padded sequences through the model (see server/models/predict.py); no session involved."""
        return await self.predictor.predict(self.repository.get(model_name, version), request)

    # ---- lifecycle --------------------------------------------------------------------------------------
    def start(self) -> None:
        for model in self.repository.models.values():
            model.start()
        self.sessions.start()
        self.persistence.start()

    async def stop(self) -> None:
        await self.sessions.stop()
        for model in self.repository.models.values():
            await model.stop()
        await self.admin.stop()
        # Every batcher has stopped: each session's state and step count are settled; write them all.
        await self.persistence.stop(self.sessions)
        self.predictor.close()
