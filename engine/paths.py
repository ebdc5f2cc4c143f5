"""Where the project caches what it derives on this machine (converted models, built kernels)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$HYBRID_LLM_CACHE, else $XDG_CACHE_HOME/hybrid-llm, else ~/.cache/hybrid-llm."""
    root = os.environ.get("HYBRID_LLM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "hybrid-llm")
    return Path(root)
