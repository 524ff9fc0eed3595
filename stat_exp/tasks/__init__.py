"""Tasks: training pools and benchmarks as rows of one schema (see `loader`).

Nothing heavy is imported here: `datasets` is imported only when a hub source is loaded.
"""

from stat_exp.tasks.loader import (DataError, fingerprint, is_local, load_benchmark, load_source, load_train_val,
                                   split_note, world_splits)

__all__ = ["DataError", "fingerprint", "is_local", "load_benchmark", "load_source", "load_train_val", "split_note",
           "world_splits"]
