"""Load a model's tokenizer and config once: per process, and for a GGUF file, once per file on disk.

Converting a GGUF's tokenizer to a fast tokenizer takes about 40 s on 2 CPU cores (Qwen2.5's 151k-token
vocabulary), and preflight and the model stage both need it. So:

- in a process, every tokenizer/config is loaded once (preflight's copy is the model stage's);
- a GGUF's converted tokenizer and its config are saved with ``save_pretrained`` under
  ``<cache>/gguf/<key>/`` (cache root: `fileio.default_cache_dir`) and read from there by later runs.
  The key hashes the file's absolute path, size and modification time and the transformers/tokenizers
  versions, so a changed file or library converts again. Writes go to a temp folder, then ``os.replace``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from ..fileio import default_cache_dir

log = logging.getLogger(__name__)

_TOKENIZERS: dict[tuple, object] = {}
_CONFIGS: dict[tuple, object] = {}


def gguf_cache_dir(source: str, gguf_file: str, cache_root: Path | None = None) -> Path:
    """``<cache>/gguf/<key>``: the converted files of this GGUF file (in this version of the libraries)."""
    import tokenizers
    import transformers

    path = (Path(source) / gguf_file).resolve()
    st = path.stat()
    text = f"{path}|{st.st_size}|{st.st_mtime_ns}|transformers {transformers.__version__}|tokenizers " \
           f"{tokenizers.__version__}"
    key = hashlib.sha256(text.encode()).hexdigest()[:20]
    return Path(cache_root if cache_root is not None else default_cache_dir()) / "gguf" / f"{path.stem}-{key}"


def _save_atomically(obj, target: Path) -> None:
    """``obj.save_pretrained`` into a temp folder next to ``target``, then renamed to ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{target.name}.tmp-", dir=target.parent))
    try:
        obj.save_pretrained(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache may be shared
        os.replace(tmp, target)
    except OSError as exc:  # another process won the race, or the cache is read-only: both fine
        log.info("could not cache %s (%s)", target, exc)
        shutil.rmtree(tmp, ignore_errors=True)


def _cached(kind: str, source: str, kwargs: dict, load, memo: dict):
    """``load(source, **kwargs)`` once per process; for a GGUF, also once per file (saved under the cache)."""
    key = (source, tuple(sorted(kwargs.items())))
    if key in memo:
        return memo[key]
    if "gguf_file" not in kwargs:
        memo[key] = load(source, **kwargs)
        return memo[key]
    folder = gguf_cache_dir(source, kwargs["gguf_file"]) / kind
    if folder.is_dir():
        try:
            memo[key] = load(str(folder))
            log.info("%s of %s: read the converted copy in %s", kind, kwargs["gguf_file"], folder)
            return memo[key]
        except Exception as exc:  # a damaged cache entry: convert again
            log.warning("cached %s in %s is unreadable (%s); converting the GGUF again", kind, folder, exc)
            shutil.rmtree(folder, ignore_errors=True)
    t0 = time.perf_counter()
    memo[key] = load(source, **kwargs)
    log.info("%s of %s converted in %.1f s; cached in %s", kind, kwargs["gguf_file"], time.perf_counter() - t0,
             folder)
    _save_atomically(memo[key], folder)
    return memo[key]


def load_tokenizer_cached(source: str, **kwargs):
    """AutoTokenizer of ``source`` (Hub id, directory, or a GGUF's folder with ``gguf_file=``), loaded once."""
    from transformers import AutoTokenizer

    def load(src, **kw):
        return AutoTokenizer.from_pretrained(src, token=os.environ.get("HF_TOKEN"), **kw)

    return _cached("tokenizer", source, kwargs, load, _TOKENIZERS)


def load_config_cached(source: str, **kwargs):
    """AutoConfig of ``source``, loaded once (for a GGUF: its metadata is parsed once per file)."""
    from transformers import AutoConfig

    def load(src, **kw):
        return AutoConfig.from_pretrained(src, token=os.environ.get("HF_TOKEN"), **kw)

    return _cached("config", source, kwargs, load, _CONFIGS)
