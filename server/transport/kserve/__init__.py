"""The KServe v2 / Triton API: servicer.py answers each RPC; codec.py turns ModelInfer requests into steps or
Predicts (tensors.py: their tensors; sequences.py: Triton sequences on sessions) and their results into
responses; models.py describes models as Triton does."""
