"""The native API (proto/rnnserve.proto): servicer.py answers each RPC, codec.py decodes and encodes steps."""
