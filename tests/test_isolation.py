"""One client's requests never change another's: KServe sequences per principal, refused STARTs, per-client
session limits on every API, sessions with different free dimensions batching side by side, snapshots that
restore only into their own model, manifests that stay inside the repository, and ids that reveal nothing."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import TINY_INPUT, tiny_expected

from rnnserve.client import Client, RnnServeError

tritonclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

ALICE, BOB = "alice-token-0123456789", "bob-token-0123456789ab"
TOL = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture
def tokens_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens"
    path.write_text(f"{ALICE} alice\n{BOB} bob\n")
    return path


def _xs(seed: int, steps: int = 4) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((steps, TINY_INPUT)).astype(np.float32)


class Triton:
    """tritonclient with one principal's token (or none)."""

    def __init__(self, address: str, token: str | None = None):
        self.client = tritonclient.InferenceServerClient(address)
        self.headers = {"authorization": f"Bearer {token}"} if token else None

    def step(self, seq, x: np.ndarray, **flags) -> np.ndarray:
        inp = tritonclient.InferInput("x", [1, TINY_INPUT], "FP32")
        inp.set_data_from_numpy(np.asarray(x, np.float32).reshape(1, TINY_INPUT))
        return self.client.infer("gru", [inp], sequence_id=seq, headers=self.headers, **flags).as_numpy("y")[0]

    def close(self) -> None:
        self.client.close()


def _refused(fn, *args, **kwargs) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        fn(*args, **kwargs)
    return info.value


# ---- KServe sequences ------------------------------------------------------------------------------------------
def test_kserve_sequence_ids_are_per_principal_with_tokens(server_factory, tiny_repository, tokens_file) -> None:
    server = server_factory(tiny_repository, auth_tokens=tokens_file)
    alice, bob = Triton(server.address, ALICE), Triton(server.address, BOB)
    xa, xb = _xs(1), _xs(2)
    try:
        ya = [alice.step(5, xa[0], sequence_start=True), alice.step(5, xa[1])]
        # bob's START of the same id is bob's own sequence: it neither ends alice's nor reaches it.
        yb = [bob.step(5, xb[0], sequence_start=True)]
        ya += [alice.step(5, x) for x in xa[2:]]
        yb += [bob.step(5, x) for x in xb[1:]]
    finally:
        alice.close()
        bob.close()
    np.testing.assert_allclose(np.stack(ya), tiny_expected(xa)[0], **TOL)
    np.testing.assert_allclose(np.stack(yb), tiny_expected(xb)[0], **TOL)


def test_a_refused_start_leaves_the_live_sequence_going_on(server_factory, tiny_repository) -> None:
    server = server_factory(tiny_repository)
    triton = Triton(server.address)
    xs = _xs(3)
    bad = xs[0].copy()
    bad[1] = np.nan
    try:
        ys = [triton.step(5, xs[0], sequence_start=True), triton.step(5, xs[1])]
        error = _refused(triton.step, 5, bad, sequence_start=True)
        assert error.status() == "StatusCode.INVALID_ARGUMENT" and "NaN" in error.message(), error
        ys += [triton.step(5, x) for x in xs[2:]]  # no START needed: the sequence is as it was
    finally:
        triton.close()
    np.testing.assert_allclose(np.stack(ys), tiny_expected(xs)[0], **TOL)
    with Client(server.address) as native:
        assert native.stats().open_sessions == 1


def test_kserve_starts_count_against_the_per_client_session_limit(server_factory, tiny_repository) -> None:
    server = server_factory(tiny_repository, max_sessions_per_client=5)
    triton = Triton(server.address)
    x = _xs(4)[0]
    try:
        with Client(server.address) as native:
            opened = [native.session("gru") for _ in range(2)]
            for seq in range(1, 4):
                triton.step(seq, x, sequence_start=True)
            # 2 native sessions + 3 sequences: the host's 5. A sixth, through either API, is refused.
            error = _refused(triton.step, 4, x, sequence_start=True)
            assert error.status() == "StatusCode.RESOURCE_EXHAUSTED", error
            assert "--max-sessions-per-client" in error.message()
            with pytest.raises(RnnServeError) as info:
                native.session("gru")
            assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            # START again on a live sequence replaces its session: still 5, allowed.
            np.testing.assert_allclose(triton.step(2, x, sequence_start=True), tiny_expected(x[None])[0][0], **TOL)
            triton.step(3, x, sequence_end=True)  # an ended sequence frees its place
            triton.step(4, x, sequence_start=True)
            assert native.stats().open_sessions == 5
            for s in opened:
                s.close()
    finally:
        triton.close()
