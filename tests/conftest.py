"""Shared fixtures, and the tiers: every test under tests/<tier>/ carries the tier's marker (unit, integration, gpu,
real_model); tests under tests/gpu/ are skipped without CUDA, except those marked ``triton`` (they run Triton's
interpreter on the CPU and skip themselves without triton)."""

import os
from pathlib import Path

import pytest

from tests.helpers.paths import DATA_DIR, TESTS

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TIERS = ("unit", "integration", "gpu", "real_model")


def pytest_collection_modifyitems(config, items):
    cuda = None
    for item in items:
        try:
            tier = Path(str(item.path)).resolve().relative_to(TESTS).parts[0]
        except ValueError:
            continue
        if tier not in TIERS:
            continue
        item.add_marker(getattr(pytest.mark, tier))
        if tier == "gpu" and item.get_closest_marker("triton") is None:
            if cuda is None:
                import torch

                cuda = torch.cuda.is_available()
            if not cuda:
                item.add_marker(pytest.mark.skip(reason="needs CUDA (tests/gpu)"))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA_DIR / "refusal_direction" / "splits").is_dir():
        pytest.skip(f"data directory {DATA_DIR} not found (set REFUSAL_DIRECTION_DATA)")
    return DATA_DIR


@pytest.fixture(scope="session")
def reference_run(data_dir) -> Path:
    return data_dir / "reference_runs" / "gemma-2b-it"


@pytest.fixture(scope="module")
def tiny_lm():
    from tests.helpers.tiny import tiny_gemma

    return tiny_gemma()
