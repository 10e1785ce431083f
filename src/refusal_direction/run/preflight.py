"""Preflight: every problem that can be found before hours of compute, reported all at once.

`check_paths` runs first and imports nothing heavy (output directory, lock-free checks of the paths the
config names), so a wrong ``--out`` or a missing file answers in well under a second; `preflight` then
reads the data and the model's config and tokenizer.
"""

from __future__ import annotations

from pathlib import Path

from ..config import RunConfig
from ..data.instructions import NAMED_SETS, resolve_data_dir, sample_sets
from ..errors import UserError, UserErrors
from .outdir import check_out_dir, config_mismatch


def looks_local(model: str) -> bool:
    """A model spec that can only be a local path (a Hub id is ``name`` or ``owner/name``)."""
    return model.startswith(("/", "./", "../", "~")) or model.endswith(".gguf") or model.count("/") > 1


def check_paths(out: Path, config: RunConfig, force: bool = False) -> None:
    """The cheap checks, before torch is imported: output directory, model path, direction file, data dir."""
    problems: list[str] = []
    try:
        check_out_dir(Path(out), config, force)
    except UserError as exc:
        problems.append(str(exc))
    c = config
    if looks_local(c.model) and not Path(c.model).expanduser().exists():
        problems.append(f"could not load model {c.model!r}: it looks like a local path but does not exist; pass an "
                        "existing local model directory or .gguf file, or a Hub id like google/gemma-2b-it")
    for key in ("harmful_train", "harmless_train", "eval", "harmful_val", "harmless_val", "harmless_eval"):
        spec = getattr(c, key)
        if spec not in NAMED_SETS and not Path(spec).expanduser().is_file():
            problems.append(f"{key}: instruction set {spec!r} is neither a named set ({', '.join(NAMED_SETS)}) nor "
                            "an existing file")
    if c.direction_file and not Path(c.direction_file).is_file():
        problems.append(f"direction file {c.direction_file!r} does not exist; pass a .safetensors file written by "
                        "refusal-direction (with its .json sidecar)")
    if c.data_dir and not Path(c.data_dir).expanduser().is_dir():
        problems.append(f"data directory {c.data_dir!r} does not exist; point --data-dir at a folder laid out like "
                        "datasets/ (refusal_direction/splits/*.json, jailbreakbench/behaviors.csv)")
    try:
        from ..core.gguf_cache import weights_cache_setting

        weights_cache_setting()
    except UserError as exc:
        problems.append(str(exc))
    if problems:
        raise UserErrors(problems)


def preflight(out: Path, config: RunConfig, force: bool = False) -> None:
    """Check data, model, direction file and output directory; raise `UserErrors` listing every problem.

    Writes nothing. Loads only the model's config and tokenizer (cheap), not its weights.
    """
    problems: list[str] = []

    def check(fn):
        try:
            return fn()
        except UserErrors as exc:
            problems.extend(exc.problems)
        except UserError as exc:
            problems.append(str(exc))
        return None

    c = config
    data_dir = check(lambda: resolve_data_dir(c.data_dir))
    if data_dir is not None:
        check(lambda: sample_sets(data_dir, c.harmful_train, c.harmless_train, c.eval, c.n_train, c.n_val, c.n_eval,
                                  c.n_harmless_eval, c.harmful_val, c.harmless_val, c.harmless_eval, c.seed,
                                  c.drop_duplicates))
    shape = check(lambda: probe_model(c))
    mode, layer, position = c.resolved_direction()
    if shape is not None:
        n_layers, d_model, n_post = shape
        if mode == "fixed" and layer is not None and not 0 <= layer < n_layers:
            problems.append(f"layer={layer} is out of range for {c.model} ({n_layers} layers: 0..{n_layers - 1})")
        if mode == "fixed" and position is not None and not -n_post <= position <= -1:
            problems.append(f"position={position} is out of range for {c.model} ({n_post} post-instruction "
                            f"tokens: -{n_post}..-1)")
        if c.direction_file:
            from ..core.directions import load_direction

            check(lambda: load_direction(c.direction_file, model_id=c.model, d_model=d_model))
    mismatch = None if force else config_mismatch(out, config)
    if mismatch is not None:
        problems.append(mismatch)
    if problems:
        raise UserErrors(problems)


def probe_model(c: RunConfig) -> tuple[int, int, int]:
    """(n_layers, d_model, n_post_instruction) from the model's config and tokenizer, without weights."""
    from ..core.model import derive_chat_format, hub_error, load_config, load_tokenizer, model_source

    source, kwargs = model_source(c.model, c.revision)
    try:
        cfg = load_config(source, **kwargs)  # the same per-process (and, for a GGUF, on-disk) copies the
        tok = load_tokenizer(source, **kwargs)  # model stage uses: a GGUF is converted once
    except Exception as exc:
        raise hub_error(c.model, exc) from exc
    text = cfg.get_text_config()
    template = Path(c.chat_template).read_text() if c.chat_template else None
    chat = derive_chat_format(tok, getattr(cfg, "model_type", ""), template)
    n_post = len(tok(chat.suffix, add_special_tokens=False)["input_ids"])
    return int(text.num_hidden_layers), int(text.hidden_size), n_post
