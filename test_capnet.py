"""CAPNet test suite: `python -m pytest -q test_capnet.py`."""
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import capnet  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parent.parent / "shared" / "data"

# -----------------------------------------------------------------------------
# tokenizer, CLIP, loading, transforms

# -----------------------------------------------------------------------------
# model, graph, GCN, prompts, losses, metrics

# -----------------------------------------------------------------------------
# fused ops and the extension

# -----------------------------------------------------------------------------
# data preparation and datasets

# -----------------------------------------------------------------------------
# synthetic-lt

# -----------------------------------------------------------------------------
# train, eval, predict, CLI, faults

# -----------------------------------------------------------------------------
# bench
