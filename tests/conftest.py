"""Test-wide settings: CPU only, one device in this process (multi-device tests run in subprocesses).

The tests compile many small XLA programs and run each only a few times, so XLA's optimisation passes cost more than
they save: they are switched off (`JAX_DISABLE_MOST_OPTIMIZATIONS`), and compiled programs are cached on disk for the
session so that subprocesses (CLI, kill-and-resume, multi-process tests) reuse what the parent compiled. Both are set
in the environment, so subprocesses inherit them.
"""

import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="dff_jax-xla-cache-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
if str(REPO) not in sys.path:  # `configs` is a folder of config files, importable from the repo root
    sys.path.insert(0, str(REPO))
