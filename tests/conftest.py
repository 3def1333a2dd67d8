"""Shared pytest configuration."""

import os

# Never touch the Hugging Face Hub from tests (a hub lookup without network hangs).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
