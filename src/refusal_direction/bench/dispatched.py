"""Random-weight models too big for one device: built empty, placed by accelerate, filled where they live.

`random_model` builds a bench shape on one device; a 70B-class shape (131 GiB in bfloat16) leaves no room for
anything else on one H200. Here the model is built on the meta device (`accelerate.init_empty_weights`: no
memory), accelerate's device map places its blocks (``"auto"`` / ``"balanced"`` / ``"sequential"`` with
``max_memory``, or an explicit map of module names to a GPU index, ``"cpu"`` or ``"disk"``), every parameter is
created on its own device and initialised there by the model class's own ``_init_weights`` (the distributions a
directly built model draws from, not the same numbers; each GPU draws from its own generator, so another map gives
another model for the same seed), and `accelerate.dispatch_model` adds the hooks that move activations between
devices. No GPU ever holds more than its share; "disk" modules are filled in CPU memory first and then written to
``offload_folder`` by the dispatch, so CPU memory must hold the "cpu" and "disk" shares together for a moment.

The result is a `LoadedModel` driven by token ids (`synthetic.id_model`), dispatched: the pipeline's stages take
their device-map paths (HF forward with hooks, HF generate) and say why the fast paths do not run.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..core.model import LoadedModel
from ..errors import UserError
from .synthetic import SHAPES, build_model, id_model

log = logging.getLogger(__name__)


def _empty_model(shape: str, dtype: torch.dtype, config: dict) -> torch.nn.Module:
    """The shape's model on the meta device, in ``dtype`` (buffers such as the rotary frequencies are real)."""
    from accelerate import init_empty_weights

    spec = SHAPES[shape]
    with init_empty_weights(include_buffers=False):  # buffers (rotary frequencies) real, whatever the environment
        return build_model(spec.family, {**spec.config, **config}, dtype, "cpu")


def device_of(device_map: dict, name: str):
    """The device of parameter ``name`` under ``device_map`` (its longest module-name prefix in the map)."""
    parts = name.split(".")
    for n in range(len(parts), -1, -1):
        key = ".".join(parts[:n])
        if key in device_map:
            return device_map[key]
    raise UserError(f"the device map places no module holding {name}; map every module (or the model, '')")


def _materialise_(model: torch.nn.Module, device_map: dict, seed: int) -> None:
    """Every meta parameter created on its mapped device ("disk": the CPU, until dispatch offloads it) and
    initialised by the model's ``_init_weights``; tied weights tied again."""
    for name, p in list(model.named_parameters()):
        if p.device.type != "meta":
            continue
        where = device_of(device_map, name)
        device = "cpu" if where == "disk" else (f"cuda:{where}" if isinstance(where, int) else where)
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        owner._parameters[attr] = torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device=device),
                                                     requires_grad=False)
    torch.manual_seed(seed)
    model.apply(model._init_weights)
    model.tie_weights()


def _check_tied(model: torch.nn.Module, device_map: dict) -> None:
    """Refuse a map that puts a tied embedding and unembedding on different devices (accelerate would re-tie
    them to one tensor on one of them)."""
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    if out is None or not getattr(model.config.get_text_config(), "tie_word_embeddings", False):
        return
    names = {m: n for n, m in model.named_modules()}
    a, b = device_of(device_map, names[inp] + ".weight"), device_of(device_map, names[out] + ".weight")
    if a != b:
        raise UserError(f"the device map puts the tied {names[inp]} on {a!r} and {names[out]} on {b!r}; map both to "
                        "one device")


def random_dispatched_model(shape: str, device_map: str | dict = "auto", max_memory: dict | None = None,
                            dtype: str = "bfloat16", offload_folder: str | Path | None = None, seed: int = 0,
                            **config) -> LoadedModel:
    """A random-weight model of a bench shape spread over devices by accelerate (see the module doc).

    ``device_map``: "auto" | "balanced" | "balanced_low_0" | "sequential" (with ``max_memory``, e.g. ``{0:
    "130GiB", 1: "130GiB"}``) or a dict of module names to devices. ``config`` overrides the shape's fields."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    from ..core.model import resolve_dtype

    if shape not in SHAPES:
        raise UserError(f"unknown model shape {shape!r}; use one of {', '.join(SHAPES)}")
    torch_dtype, _ = resolve_dtype(dtype, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    model = _empty_model(shape, torch_dtype, config)
    if isinstance(device_map, str):
        no_split = list(getattr(model, "_no_split_modules", None) or [])
        memory = max_memory
        if device_map in ("auto", "balanced", "balanced_low_0"):
            memory = get_balanced_memory(model, max_memory=max_memory, no_split_module_classes=no_split,
                                         dtype=torch_dtype, low_zero=device_map == "balanced_low_0")
        elif device_map != "sequential":
            raise UserError(f"device_map={device_map!r}: use auto, balanced, balanced_low_0, sequential or a dict")
        device_map = infer_auto_device_map(model, max_memory=memory, no_split_module_classes=no_split,
                                           dtype=torch_dtype)
    if "disk" in device_map.values() and offload_folder is None:
        raise UserError("the device map offloads modules to disk: pass offload_folder (a directory with room)")
    _check_tied(model, device_map)
    _materialise_(model, device_map, seed)
    model.eval().requires_grad_(False)
    model = dispatch_model(model, device_map=device_map, offload_dir=str(offload_folder) if offload_folder else None)
    model.hf_device_map = dict(device_map)
    spec = SHAPES[shape]
    lm = id_model(model, f"{shape} (random weights, dispatched)", spec.prefix_ids, spec.suffix_ids, spec.special_ids,
                  pad=spec.config["pad_token_id"], bos=spec.config["bos_token_id"], eos=spec.config["eos_token_id"],
                  first_body_id=spec.first_body_id)
    log.info("random %s dispatched: %s", shape, lm.placement or "one device")
    return lm


def peak_memory() -> dict[str, float]:
    """GiB of device memory allocated at peak on each GPU since the last `reset_peak_memory` (empty without CUDA)."""
    if not torch.cuda.is_available():
        return {}
    return {f"cuda:{i}": torch.cuda.max_memory_allocated(i) / 2 ** 30 for i in range(torch.cuda.device_count())}


def reset_peak_memory() -> None:
    for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        torch.cuda.reset_peak_memory_stats(i)


__all__ = ["device_of", "peak_memory", "random_dispatched_model", "reset_peak_memory"]
