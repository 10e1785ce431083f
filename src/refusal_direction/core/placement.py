"""Placement: a model dispatched over devices by accelerate (``device_map`` / ``max_memory``), and its tensors.

- `parse_device_map`: ``auto | balanced | balanced_low_0 | sequential`` or a JSON file ``{"module": device}``
  (devices: a GPU index, ``"cpu"`` or ``"disk"``), as transformers' ``from_pretrained(device_map=...)`` takes it;
- `parse_max_memory`: ``"0=60GiB,cpu=200GiB"`` -> ``{0: "60GiB", "cpu": "200GiB"}``;
- `module_device`: where a module *runs* — accelerate's hook's execution device (an offloaded block's weights
  sit on cpu/disk/meta but it runs on the main GPU), else its first parameter's device;
- `placement_note`: why a model is not on one device ("" if it is), for the fast paths' logs;
- `DeviceCopies`: a tensor copied once to each device that asks for it. A hook on a dispatched model sees
  each block's hidden states on that block's device (PyTorch runs forward pre-hooks before accelerate
  moves the inputs), so the direction must follow the activations, not the model's input device.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from ..config import DEVICE_MAPS as DEVICE_MAP_STRATEGIES
from ..errors import UserError

_SIZE = re.compile(r"^\d+(\.\d+)?\s*([KMGT]i?B)?$", re.IGNORECASE)


def parse_device_map(spec: str | dict) -> str | dict:
    """A strategy name or a {module name: device} dict (from a JSON file); raises UserError with the fix."""
    if isinstance(spec, dict):
        return spec
    if spec in DEVICE_MAP_STRATEGIES:
        return spec
    path = Path(spec)
    if not path.is_file():
        raise UserError(f"device_map={spec!r} is neither one of {', '.join(DEVICE_MAP_STRATEGIES)} nor an existing "
                        'JSON file mapping module names to devices, e.g. {"model.layers.0": 0, "lm_head": "cpu"}')
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"device map file {spec} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict) or not data:
        raise UserError(f"device map file {spec} must hold a non-empty JSON object {{module name: device}}")
    return {k: _device_value(v, spec) for k, v in data.items()}


def _device_value(v, where: str):
    if isinstance(v, int) or v in ("cpu", "disk", "meta") or (isinstance(v, str) and v.startswith(("cuda", "mps"))):
        return v
    raise UserError(f"device {v!r} in {where} is not a GPU index, 'cuda:N', 'cpu' or 'disk'")


def parse_max_memory(spec: str | dict) -> dict:
    """``"0=60GiB,cpu=200GiB"`` -> ``{0: "60GiB", "cpu": "200GiB"}`` (keys: GPU index, cpu, disk)."""
    if isinstance(spec, dict):
        return spec
    out: dict = {}
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        key, sep, size = part.partition("=")
        key, size = key.strip(), size.strip()
        if not sep or not _SIZE.match(size) or not (key.isdigit() or key in ("cpu", "disk", "mps")):
            raise UserError(f"max_memory={spec!r}: use DEVICE=SIZE pairs separated by commas, DEVICE a GPU index, "
                            "cpu or disk and SIZE like 60GiB (e.g. 0=60GiB,cpu=200GiB)")
        out[int(key) if key.isdigit() else key] = size
    if not out:
        raise UserError(f"max_memory={spec!r} is empty; e.g. 0=60GiB,cpu=200GiB")
    return out


def as_device(value) -> torch.device:
    """A device_map value (GPU index, "cpu", "cuda:1", a torch.device) as a torch.device."""
    if isinstance(value, int):
        return torch.device("cuda", value)
    return torch.device(value)


def module_device(module: nn.Module) -> torch.device:
    """Where ``module`` runs: accelerate's execution device if it is hooked, else its first parameter's device."""
    hook = getattr(module, "_hf_hook", None)
    for h in [hook, *getattr(hook, "hooks", ())]:  # a SequentialHook holds several
        dev = getattr(h, "execution_device", None)
        if dev is not None:
            return as_device(dev)
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def placement_note(model: nn.Module) -> str:
    """Why ``model`` is not on one device ("" if it is), read from accelerate's ``hf_device_map``."""
    device_map = getattr(model, "hf_device_map", None)
    if not device_map:
        return ""
    places = sorted({str(as_device(v)) if v not in ("disk",) else "disk" for v in device_map.values()})
    if len(places) == 1 and places[0] not in ("disk", "meta"):
        return ""
    counts = {p: sum(1 for v in device_map.values() if (str(as_device(v)) if v != "disk" else "disk") == p)
              for p in places}
    return "dispatched by accelerate over " + ", ".join(f"{p} ({n} modules)" for p, n in counts.items())


class DeviceCopies:
    """A tensor plus its copies on other devices, each made once, on first use (``on(device)``)."""

    def __init__(self, tensor: torch.Tensor):
        self._source = tensor
        self._by_device = {tensor.device: tensor}

    def on(self, device: torch.device) -> torch.Tensor:
        t = self._by_device.get(device)
        if t is None:
            t = self._by_device[device] = self._source.to(device)
        return t
