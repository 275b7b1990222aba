"""Durable file writes: the one implementation is dz_kernels.atomic (the kernel library writes files too and must not
import the model); this module re-exports it under the model's name."""
from dz_kernels.atomic import (atomic_output, atomic_write, atomic_write_json, atomic_write_text, fsync_dir,
                               fsync_tree, remove_quietly)

__all__ = ["atomic_output", "atomic_write", "atomic_write_json", "atomic_write_text", "fsync_dir", "fsync_tree",
           "remove_quietly"]
