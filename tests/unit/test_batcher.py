"""The batcher's loop (server/scheduling/batcher.py) on an event loop, with a tiny numpy model and no server:
sessions' steps batch together, concurrent batches split the ready sessions, a session's steps and control
jobs apply in order, and stop() leaves nothing running."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
from accumulator import Accumulator, accumulator_manifest

from rnnserve.server.core.session import Session
from rnnserve.server.core.work import ControlJob, StepJob
from rnnserve.server.models.model import LoadedModel

MANIFEST = accumulator_manifest()


def _model(tmp_path: Path, **kw: int) -> tuple[LoadedModel, Accumulator]:
    runtime = Accumulator(MANIFEST)
    return LoadedModel(MANIFEST, tmp_path, runtime, max_queue_delay_us=0, **kw), runtime


def _step(loop: asyncio.AbstractEventLoop, x: float) -> StepJob:
    return StepJob({"x": np.full(2, x, np.float32)}, 0, loop.create_future())


def test_ready_sessions_batch_together_and_concurrent_batches_split_them(tmp_path) -> None:
    async def main() -> None:
        model, runtime = _model(tmp_path, concurrent_batches=2)
        model.start()
        assert model.batcher is not None
        loop = asyncio.get_running_loop()
        sessions = [Session(f"session-{i:08d}", model, model.acquire()) for i in range(64)]
        jobs = [_step(loop, float(i)) for i in range(64)]
        for session, job in zip(sessions, jobs, strict=True):
            model.batcher.enqueue(session, job)
        results = await asyncio.gather(*(job.future for job in jobs))  # type: ignore[misc]
        await model.stop()
        # Two free slots, 64 ready sessions: two batches of 32 side by side, not one of 64.
        assert runtime.sizes == [32, 32]
        for i, (outputs, steps) in enumerate(results):
            assert steps == 1 and outputs[0][0].tolist() == [float(i)] * 2
        stats = model.batcher.stats
        assert stats.batches == 2 and stats.steps == 64 and model.batcher.queued_steps == 0

    asyncio.run(main())


def test_a_sessions_steps_and_control_jobs_apply_in_order(tmp_path) -> None:
    async def main() -> None:
        model, runtime = _model(tmp_path)
        model.start()
        assert model.batcher is not None
        loop = asyncio.get_running_loop()
        session = Session("session-00000001", model, model.acquire())
        first, second = _step(loop, 1.0), _step(loop, 2.0)
        read = ControlJob(lambda: model.slab.read(session.slot)[0].tolist(), loop.create_future())
        third = _step(loop, 4.0)
        for job in (first, second, read, third):
            model.batcher.enqueue(session, job)
        assert (await third.future)[1] == 3  # type: ignore[misc]
        assert [(await j.future)[0][0][0].tolist() for j in (first, second, third)] == [  # type: ignore[misc]
            [1.0, 1.0],
            [3.0, 3.0],
            [7.0, 7.0],
        ]
        assert read.future.result() == [3.0, 3.0]  # between the second and third steps
        assert runtime.sizes == [1, 1, 1]  # one step of a session per batch
        await model.stop()

    asyncio.run(main())
