"""Load a model's tokenizer, config and weights once: per process, and for a GGUF file, once per file on disk.

Converting a GGUF's tokenizer to a fast tokenizer takes about 40 s on 2 CPU cores (Qwen2.5's 151k-token
vocabulary), and dequantizing its weights as long again; preflight and the model stage both need the tokenizer.
So:

- in a process, every tokenizer/config is loaded once (preflight's copy is the model stage's);
- a GGUF's converted tokenizer and its config are saved with ``save_pretrained`` under
  ``<cache>/gguf/<key>/`` (cache root: `fileio.default_cache_dir`) and read from there by later runs.
  The key hashes the file's absolute path, size and modification time and the transformers/tokenizers
  versions, so a changed file or library converts again. Writes go to a temp folder, then ``os.replace``;
  an entry that does not load is deleted and converted again.
- a GGUF's **weights** (`load_causal_lm`): the first load dequantizes them in float32 on the CPU, as
  transformers does, and saves them as a plain transformers checkpoint (config.json + safetensors, no
  quantization_config; tied embeddings stay tied) in ``<cache>/gguf/<key>/model/``; that load and every later
  one then read that folder with ``from_pretrained(folder, dtype=..., device_map=...)`` (seconds), so a float32
  and a bfloat16 run read the same copy, and the first run gets exactly what later ones get. The copy is
  4 bytes per parameter (2.5 GB for the demo's Qwen2.5-0.5B GGUF, which carries its own lm_head; 32 GB for an
  8B model), so by default only GGUF files of at most `MAX_GGUF_BYTES` (4 GiB) are cached;
  ``REFUSAL_DIRECTION_GGUF_WEIGHTS_CACHE=0`` turns it off, ``=1`` caches any size.
  Where it went and how big it is is logged when it is written. It is skipped, with a log line, when
  the cache folder is not writable or has too little free space (the size, estimated from the config, plus
  5 %); then the GGUF is loaded directly, as before, in the requested dtype. A GGUF whose weights
  transformers keeps packed (a GGUF matmul kernel from the Hub) is not cached either. The first load holds the
  float32 model in CPU memory once (then frees it and reads the copy as asked).
  For the files transformers dequantizes with gguf-py (all architectures but qwen35 in 5.x: float32, then
  cast) a bfloat16 load of the copy is bit-identical to a direct one; its newer loader (qwen35) dequantizes
  straight into bfloat16, rounding the block scale first, so there weights may differ by one bf16 ulp.
"""

from __future__ import annotations

import functools
import gc
import hashlib
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from ..errors import UserError
from ..fileio import default_cache_dir

log = logging.getLogger(__name__)

_TOKENIZERS: dict[tuple, object] = {}
_CONFIGS: dict[tuple, object] = {}

WEIGHTS_ENV = "REFUSAL_DIRECTION_GGUF_WEIGHTS_CACHE"
MAX_GGUF_BYTES = 4 * 2**30  # larger GGUF files are not cached unless REFUSAL_DIRECTION_GGUF_WEIGHTS_CACHE=1
_STALE_TMP_S = 3600  # a temp folder this old is left by a killed writer


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


def _save_atomically(save, target: Path, errors: tuple = (OSError,)) -> bool:
    """``save(folder)`` into a temp folder next to ``target``, then renamed to ``target``; False if it failed."""
    tmp = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{target.name}.tmp-", dir=target.parent))
        save(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private (and some writers their files); the cache may be shared
        for file in tmp.iterdir():
            os.chmod(file, 0o644)
        os.replace(tmp, target)
        return True
    except errors as exc:  # another process won the race, or the cache is read-only: both fine
        log.info("could not cache %s (%s)", target, exc)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        return False


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
    _save_atomically(memo[key].save_pretrained, folder)
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


# --------------------------------------------------------------------------------------------------
# Weights


def load_causal_lm(source: str, dtype, token: str | None = None, kwargs: dict | None = None,
                   dispatch: dict | None = None):
    """``AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs, **dispatch)``; for a GGUF
    (``gguf_file`` in ``kwargs``) its dequantized weights are converted once and read from the cache after."""
    from transformers import AutoModelForCausalLM

    kwargs, dispatch = dict(kwargs or {}), dict(dispatch or {})
    if "gguf_file" not in kwargs:
        return AutoModelForCausalLM.from_pretrained(source, dtype=dtype, token=token, **kwargs, **dispatch)
    return load_gguf_model(source, kwargs["gguf_file"], dtype, dispatch, token)


def load_gguf_model(source: str, gguf_file: str, dtype, dispatch: dict | None = None, token: str | None = None):
    """The model of ``source/gguf_file`` in ``dtype`` (placed by ``dispatch``: device_map, max_memory,
    offload_folder), read from its converted copy in the cache; the first load converts and writes that copy."""
    import torch
    from transformers import AutoModelForCausalLM

    dispatch = dict(dispatch or {})

    def direct(dt, **kw):
        return AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_file, dtype=dt, token=token, **kw)

    folder = gguf_cache_dir(source, gguf_file) / "model"
    reason = weights_cache_off(Path(source) / gguf_file)
    if reason is None:
        model = _read_weights(folder, gguf_file, dtype, dispatch)
        if model is not None:
            return model
        reason = _cannot_write(folder, _dense_bytes(source, gguf_file))
    if reason is not None:
        log.info("weights of %s are not cached (%s); converting them", gguf_file, reason)
        return direct(dtype, **dispatch)
    t0 = time.perf_counter()
    model = direct(torch.float32)  # on the CPU, in float32: the one copy every dtype and placement reads
    seconds = time.perf_counter() - t0
    if not _dense(model):
        log.info("weights of %s stay packed (GGUF kernel); not cached", gguf_file)
        del model
        return direct(dtype, **dispatch)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    saved = _save_atomically(functools.partial(_save_weights, model), folder, errors=(Exception,))
    if saved:
        log.info("weights of %s converted in %.1f s; cached in %s (%.2f GB, float32; %s=0 turns this off)",
                 gguf_file, seconds, folder, size / 1e9, WEIGHTS_ENV)
        del model
        gc.collect()
        model = _read_weights(folder, gguf_file, dtype, dispatch)
        if model is not None:
            return model
        return direct(dtype, **dispatch)
    if dtype == torch.float32 and not dispatch:
        return model
    del model  # not model.to(dtype): that would also cast buffers from_pretrained keeps in float32 (RoPE's)
    return direct(dtype, **dispatch)


def weights_cache_setting() -> str:
    """``REFUSAL_DIRECTION_GGUF_WEIGHTS_CACHE`` read: "off" (0/false/no/off), "on" (1/true/yes/on: any size) or
    "default" (unset or empty: files up to 4 GiB); `UserError` for any other value (preflight checks it)."""
    value = os.environ.get(WEIGHTS_ENV, "").strip().lower()
    if value in ("0", "false", "no", "off"):
        return "off"
    if value in ("1", "true", "yes", "on"):
        return "on"
    if value:
        raise UserError(f"{WEIGHTS_ENV}={os.environ[WEIGHTS_ENV]!r} is not a switch: set it to 0 (never cache GGUF "
                        f"weights), 1 (cache any size), or unset it (cache files up to "
                        f"{MAX_GGUF_BYTES / 2**30:.0f} GiB)")
    return "default"


def weights_cache_off(path: Path) -> str | None:
    """Why the weights of the GGUF file ``path`` are not cached (None: they are)."""
    setting = weights_cache_setting()
    if setting == "off":
        return f"{WEIGHTS_ENV}={os.environ[WEIGHTS_ENV].strip()}"
    if setting == "on":
        return None
    size = path.stat().st_size
    if size > MAX_GGUF_BYTES:
        return (f"the file is {size / 2**30:.1f} GiB, over the {MAX_GGUF_BYTES / 2**30:.0f} GiB default limit; "
                f"{WEIGHTS_ENV}=1 caches it anyway, at 4 bytes per parameter")
    return None


def drop_gguf_quantizer_(model) -> None:
    """A dequantized GGUF model is dense but still carries its (unserializable) GGUF quantizer; drop it, and the
    config's quantization_config (which would make a reload GGUF-quantized again)."""
    if getattr(model, "hf_quantizer", None) is None:
        return
    model.hf_quantizer = None
    model.is_quantized = False
    model.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    log.info("saving the dequantized GGUF weights as a plain safetensors checkpoint")


def _save_weights(model, folder: Path) -> None:
    """The dequantized model as a plain transformers checkpoint (its quantizer dropped; tied weights stay tied)."""
    drop_gguf_quantizer_(model)
    model.save_pretrained(folder)


def _read_weights(folder: Path, gguf_file: str, dtype, dispatch: dict):
    """The cached model in ``folder`` (None if there is none, or it does not load completely: then it is deleted)."""
    from transformers import AutoModelForCausalLM

    if not folder.is_dir():
        return None
    t0 = time.perf_counter()
    try:
        model, info = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, output_loading_info=True,
                                                           **dispatch)
        bad = {k: sorted(v)[:3] for k, v in info.items() if v and k != "error_msgs"}
        if bad or info.get("error_msgs") or getattr(model, "hf_quantizer", None) is not None:
            raise ValueError(f"incomplete checkpoint: {bad or info.get('error_msgs') or 'quantized'}")
    except Exception as exc:  # a damaged cache entry: convert again
        log.warning("cached weights in %s are unreadable (%s); converting the GGUF again", folder, exc)
        shutil.rmtree(folder, ignore_errors=True)
        return None
    log.info("weights of %s: read the converted copy in %s (%.1f s)", gguf_file, folder, time.perf_counter() - t0)
    return model


def _cannot_write(folder: Path, need: int | None) -> str | None:
    """Why ``folder`` cannot be written (None: it can): not writable, or less free space than ``need`` + 5 %."""
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder.parent):
            pass
    except OSError as exc:
        return f"the cache folder {folder.parent} is not writable: {exc}"
    _remove_stale_tmp(folder)
    free = shutil.disk_usage(folder.parent).free
    if need is not None and free < need * 1.05:
        return f"{free / 1e9:.1f} GB free in {folder.parent}, the float32 copy needs {need / 1e9:.1f} GB"
    return None


def _remove_stale_tmp(folder: Path) -> None:
    """Temp folders of writers that were killed (older than an hour) take as much space as a copy: delete them."""
    for tmp in folder.parent.glob(f"{folder.name}.tmp-*"):
        try:
            if time.time() - tmp.stat().st_mtime > _STALE_TMP_S:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            pass


def _dense_bytes(source: str, gguf_file: str) -> int | None:
    """Bytes of the float32 copy, from the config (model built on the meta device, no weights read); None if
    that fails."""
    try:
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM

        config = load_config_cached(source, gguf_file=gguf_file)
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config)
        return 4 * sum(p.numel() for p in model.parameters())
    except Exception as exc:  # only an estimate: write without the check
        log.info("could not estimate the size of the weights of %s (%s)", gguf_file, exc)
        return None


def _dense(model) -> bool:
    """Whether every weight is a plain floating-point tensor (none kept in GGUF blocks)."""
    packed = getattr(getattr(model, "hf_quantizer", None), "packed_modules", None)
    return not packed and all(p.is_floating_point() for p in model.parameters())
