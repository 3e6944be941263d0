"""Model versions and where they come from: a loaded version (model.py: manifest, runtime, state slab, its
batcher), the runtimes that call artifacts (runtime/), the repository on disk (repository.py, paths.py), loading
and unloading while serving (admin.py, watch.py), and whole-sequence calls (predict.py)."""
