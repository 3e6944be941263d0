"""The KServe codec (server/transport/kserve/codec.py) without sockets: a ModelInferRequest's wire bytes
become a sequence step (raw or typed contents), a one-step Predict, or a refusal in
Triton's words where Triton clients match on them, and each result its response, checked against the eager
model."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from codec_support import serving
from conftest import TINY_INPUT, TINY_OUTPUT, tiny_expected

from rnnserve.proto import kserve_grpc_service_pb2 as kpb
from rnnserve.server.errors import InvalidArgument
from rnnserve.server.transport.kserve.codec import InferCodec, InferStream

CLIENT = ""  # the anonymous callers' namespace of sequence ids


def infer(
    x: np.ndarray, *, sequence: int | str = 0, start: bool = False, end: bool = False, raw: bool = True, **fields
):
    request = kpb.ModelInferRequest(model_name="gru", id=fields.pop("id", ""), **fields)
    tensor = request.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
    if raw:
        request.raw_input_contents.append(x.astype(np.float32).tobytes())
    else:
        tensor.contents.fp32_contents.extend(x.ravel().tolist())
    if sequence:
        key = "string_param" if isinstance(sequence, str) else "int64_param"
        setattr(request.parameters["sequence_id"], key, sequence)
        request.parameters["sequence_start"].bool_param = start
        request.parameters["sequence_end"].bool_param = end
    return request


def output(response: kpb.ModelInferResponse, name: str = "y") -> np.ndarray:
    (i,) = [i for i, o in enumerate(response.outputs) if o.name == name]
    tensor = response.outputs[i]
    assert tensor.datatype == "FP32"
    return np.frombuffer(response.raw_output_contents[i], np.float32).reshape(tensor.shape)


def test_streamed_sequence_steps_equal_eager_raw_or_typed(tiny_repository) -> None:
    async def main() -> None:
        async with serving(tiny_repository) as server:
            codec = InferCodec(server.dataplane)
            stream = InferStream(codec, CLIENT, None)
            xs = np.random.default_rng(3).standard_normal((4, TINY_INPUT)).astype(np.float32)
            ys = []
            for t, x in enumerate(xs):
                # Raw contents or typed contents: the same step.
                request = infer(x[None], sequence=7, start=t == 0, end=t == 3, raw=t % 2 == 0, id=f"r{t}")
                raw, before = stream.receive(request.SerializeToString())
                assert before is None
                item = stream.submit(raw)
                response = await stream.answer(item)
                assert response.infer_response.id == f"r{t}" and response.infer_response.model_version == "1"
                assert output(response.infer_response).shape == (1, TINY_OUTPUT)
                ys.append(output(response.infer_response)[0])
            np.testing.assert_allclose(np.stack(ys), tiny_expected(xs)[0], atol=1e-5)
            assert len(codec.sequences) == 0  # END closed it

    asyncio.run(main())


def test_a_request_without_a_sequence_is_a_one_step_predict_of_its_batch(tiny_repository) -> None:
    async def main() -> None:
        async with serving(tiny_repository) as server:
            codec = InferCodec(server.dataplane)
            x = np.random.default_rng(4).standard_normal((3, TINY_INPUT)).astype(np.float32)
            response = await codec.submit(infer(x), CLIENT)
            y = output(response)
            assert y.shape == (3, TINY_OUTPUT)
            for row in range(3):
                np.testing.assert_allclose(y[row], tiny_expected(x[row : row + 1])[0][0], atol=1e-5)
            assert len(server.dataplane.sessions) == 0

    asyncio.run(main())


TRITON_WORDS = [  # (request, the words Triton clients and tests/integration/test_kserve.py match on)
    (
        infer(np.ones((1, 4)), sequence=1, start=True),
        "unexpected shape for input 'x' for model 'gru'. Expected [-1,3], got [1,4]",
    ),
    (infer(np.ones((2, 3)), sequence=1, start=True), "input 'x' needs batch dimension 1, got [2,3]"),
    (
        infer(np.ones((1, 3)), outputs=[kpb.ModelInferRequest.InferRequestedOutputTensor(name="z")]),
        "unexpected inference output 'z' for model 'gru'",
    ),
]


@pytest.mark.parametrize(("request_", "words"), TRITON_WORDS)
def test_refusals_triton_clients_match_on_read_in_tritons_words(tiny_repository, request_, words) -> None:
    async def main() -> None:
        async with serving(tiny_repository) as server:
            codec = InferCodec(server.dataplane)
            with pytest.raises(InvalidArgument) as info:
                codec.submit(request_, CLIENT)
            assert words in info.value.message
            assert len(codec.sequences) == 0 and len(server.dataplane.sessions) == 0  # a refused START opened nothing

    asyncio.run(main())


def test_other_refusals_read_as_on_the_native_api(tiny_repository) -> None:
    async def main() -> None:
        async with serving(tiny_repository) as server:
            codec = InferCodec(server.dataplane)
            request = infer(np.ones((1, 3)), sequence=1, start=True)
            request.inputs[0].name = "q"
            with pytest.raises(
                InvalidArgument, match=r"model gru:1 takes 1 input tensor\(s\): 'x' float32\[3\]; got \['q'\]"
            ):
                codec.submit(request, CLIENT)
            nan = infer(np.full((1, 3), np.nan), sequence=1, start=True)
            with pytest.raises(InvalidArgument, match="input 'x' of model gru:1 holds NaN or Inf"):
                codec.submit(nan, CLIENT)

    asyncio.run(main())


def test_a_malformed_streamed_request_is_answered_in_the_stream(tiny_repository) -> None:
    async def main() -> None:
        async with serving(tiny_repository) as server:
            stream = InferStream(InferCodec(server.dataplane), CLIENT, None)
            raw, _ = stream.receive(b"\xff\xff")
            item = stream.submit(raw)
            with pytest.raises(InvalidArgument) as info:
                await stream.answer(item)
            response = stream.failed(item, info.value)
            assert "not a valid rnnserve.kserve.v2.ModelInferRequest" in response.error_message
            # A sequence step without START is answered with Triton's words, its request named.
            raw, _ = stream.receive(infer(np.ones((1, 3)), sequence=9, id="late").SerializeToString())
            item = stream.submit(raw)
            with pytest.raises(InvalidArgument) as info:
                await stream.answer(item)
            response = stream.failed(item, info.value)
            assert "must specify the START flag" in response.error_message
            assert (response.infer_response.model_name, response.infer_response.id) == ("gru", "late")

    asyncio.run(main())
