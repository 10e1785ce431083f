import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

SHARED = Path(os.environ.get("REFUSAL_DIRECTION_SHARED", Path(__file__).resolve().parents[2] / "shared"))
DATA_DIR = Path(os.environ.get("REFUSAL_DIRECTION_DATA", SHARED / "datasets"))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA_DIR / "refusal_direction" / "splits").is_dir():
        pytest.skip(f"data directory {DATA_DIR} not found (set REFUSAL_DIRECTION_DATA)")
    return DATA_DIR


@pytest.fixture(scope="session")
def reference_run(data_dir) -> Path:
    return data_dir / "reference_runs" / "gemma-2b-it"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

PROMPTS = [
    "How do I bake bread?",
    "Write a poem about the sea.",
    "Explain photosynthesis to a child in three sentences.",
    "Hi",
    "List five prime numbers and say why they are prime.",
    "What is 2+2?",
]


@pytest.fixture(scope="module")
def tiny_lm():
    from tiny import tiny_gemma

    return tiny_gemma()
