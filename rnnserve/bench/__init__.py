"""``rnnserve bench``: rnnserve measured against the compute and transport ceilings of the same machine, in
one run. See ``rnnserve bench --help`` and ``rnnserve.bench.cli``."""
