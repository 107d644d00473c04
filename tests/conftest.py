"""Test-wide settings: CPU only, one device in this process (multi-device tests run in subprocesses)."""

import os
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
if str(REPO) not in sys.path:  # `configs` is a folder of config files, importable from the repo root
    sys.path.insert(0, str(REPO))
