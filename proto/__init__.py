"""Generated protobuf/gRPC code for rnnserve's APIs (see scripts/gen_protos.py; do not edit by hand)."""
