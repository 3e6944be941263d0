"""rnnserve: serve stateful recurrent models one timestep at a time over gRPC.

Subpackages: ``rnnserve.export`` (step modules, ONNX/TorchScript export with parity checks),
``rnnserve.server`` (the session server), ``rnnserve.client`` (sync and asyncio SDK, numpy only),
``rnnserve.proto`` (generated gRPC code), ``rnnserve.examples`` (the reference models).
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
