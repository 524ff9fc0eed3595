"""Tasks: training pools and benchmarks as rows of one schema (see `loader`).

Nothing heavy is imported here: `datasets` is imported only when a hub source is loaded.
"""

from stat_exp.tasks.loader import DataError, fingerprint, load_benchmark, load_source, load_train_val, world_splits

__all__ = ["DataError", "fingerprint", "load_benchmark", "load_source", "load_train_val", "world_splits"]
