"""Scheduling: batch formation (formation.py), where batches compute (dispatch.py), a batch's one path from
gather to completion (execution.py), the loop tying them together per model version (batcher.py), and its
statistics (stats.py)."""
