"""The one place a request's tensors are checked against a model (server/core/validation.py), in one wording
for every API, and Triton's words where the KServe codec passes them."""

from __future__ import annotations

import numpy as np
import pytest

from rnnserve.manifest import ModelManifest
from rnnserve.server.core.validation import TensorChecks
from rnnserve.server.errors import InvalidArgument
from rnnserve.server.transport.kserve.codec import TRITON

MANIFEST = ModelManifest(
    name="m",
    version=2,
    format="onnx",
    artifact="model.onnx",
    inputs=[{"name": "x", "shape": [-1, 3]}, {"name": "t", "dtype": "int64", "shape": [-1, -1]}],
    outputs=[{"name": "y", "shape": [-1, 2]}],
    states=[{"name": "h", "output": "h_out", "shape": [-1, 4]}],
    parameters=[{"name": "p", "shape": [-1, 2]}, {"name": "q", "shape": [-1], "default": 1.0}],
)
CHECKS = TensorChecks(MANIFEST, "m:2")
X = np.zeros(3, np.float32)
T = np.zeros(5, np.int64)


def refusal(fn, *args, **kwargs) -> str:
    with pytest.raises(InvalidArgument) as info:
        fn(*args, **kwargs)
    return info.value.message


def test_inputs_come_back_in_manifest_order_with_any_size_where_the_manifest_says_so() -> None:
    checked = CHECKS.inputs({"t": T, "x": X})
    assert list(checked) == ["x", "t"]
    chunk = CHECKS.inputs({"x": np.zeros((4, 3), np.float32), "t": np.zeros((4, 7), np.int64)}, 4)
    assert chunk["t"].shape == (4, 7)


@pytest.mark.parametrize(
    ("given", "lead_size", "words"),
    [
        ({"x": X}, 0, "model m:2 takes 2 input tensor(s): 'x' float32[3], 't' int64[*]; got ['x']"),
        ({"x": X, "t": T, "u": T}, 0, "takes 2 input tensor(s)"),
        ({"x": X.astype(np.float64), "t": T}, 0, "input 'x' of model m:2: expected dtype float32, got float64"),
        (
            {"x": np.zeros(4, np.float32), "t": T},
            0,
            "input 'x' of model m:2: expected shape [3] (per-session shape, no batch axis), got [4]",
        ),
        (
            {"x": np.zeros((2, 3), np.float32), "t": np.zeros((2, 1), np.int64)},
            3,
            "input 'x' of model m:2: expected shape [3, 3] ([num_steps, ...per-session shape]), got [2, 3]",
        ),
        ({"x": np.array([0, np.inf, 0], np.float32), "t": T}, 0, "input 'x' of model m:2 holds NaN or Inf"),
    ],
)
def test_input_refusals_name_the_tensor_and_what_was_expected(given, lead_size, words) -> None:
    assert words in refusal(CHECKS.inputs, given, lead_size)


def test_nan_is_left_to_the_caller_when_asked_and_found_per_row() -> None:
    rows = np.zeros((3, 3), np.float32)
    rows[1, 2] = np.nan
    CHECKS.inputs({"x": rows, "t": np.zeros((3, 1), np.int64)}, 3, lead="sessions", finite=False)
    assert CHECKS.nonfinite_rows({"x": rows}) == {1: "x"}
    assert "NaN or Inf" in refusal(CHECKS.finite, {"x": rows})


def test_outputs_states_and_parameters() -> None:
    assert CHECKS.outputs([]) == [] and CHECKS.outputs(["y"]) == ["y"]
    assert refusal(CHECKS.outputs, ["z"]) == "model m:2 has no output ['z']; its outputs are ['y']"
    initial = [np.ones(4, np.float32)]
    assert CHECKS.states({}, initial, partial=True)[0] is initial[0]
    assert refusal(CHECKS.states, {}, initial, partial=False) == "state 'h' is missing: expected float32[4]"
    assert "no state named ['c']" in refusal(CHECKS.states, {"c": X}, initial, partial=True)
    defaults = [None, np.ones(1, np.float32)]
    assert "needs parameter 'p' (float32[2]) at session open" in refusal(CHECKS.parameters, {}, defaults)
    p = np.zeros(2, np.float32)
    assert CHECKS.parameters({"p": p}, defaults)[1] is defaults[1]
    # One per sequence of a Predict: stacked on a leading batch axis, defaults broadcast.
    stacked = CHECKS.parameters({"p": np.zeros((3, 2), np.float32)}, defaults, batch=3)
    assert stacked[1].shape == (3, 1)
    assert "needs parameter 'p' (float32[2]) for each sequence" in refusal(CHECKS.parameters, {}, defaults, batch=3)
    words = refusal(CHECKS.parameters, {"p": p}, defaults, batch=3)
    assert words == "parameter 'p' of model m:2: expected shape [3, 2] ([batch, ...per-session shape]), got [2]"


def test_tritons_words_for_what_triton_clients_match_on() -> None:
    batch = {"x": np.zeros((1, 4), np.float32), "t": np.zeros((1, 2), np.int64)}
    words = refusal(CHECKS.inputs, batch, -1, lead="batch", finite=False, wording=TRITON)
    assert words == "unexpected shape for input 'x' for model 'm'. Expected [-1,3], got [1,4]"
    batch["x"] = np.zeros((1, 3), np.float64)
    words = refusal(CHECKS.inputs, batch, -1, lead="batch", finite=False, wording=TRITON)
    assert words == "inference input 'x' data-type is 'FP64', but model 'm' expects 'FP32'"
    assert refusal(CHECKS.outputs, ["z"], TRITON) == "unexpected inference output 'z' for model 'm'"
