"""Where the shared fixtures live: ``REFUSAL_DIRECTION_SHARED`` (default: ``shared/`` next to the repository) and
the data directory ``REFUSAL_DIRECTION_DATA`` (default: ``<shared>/datasets``)."""

import os
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
REPO = TESTS.parent
SHARED = Path(os.environ.get("REFUSAL_DIRECTION_SHARED", REPO.parent / "shared"))
DATA_DIR = Path(os.environ.get("REFUSAL_DIRECTION_DATA", SHARED / "datasets"))
