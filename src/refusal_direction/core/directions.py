"""Directions stage: difference in means, and the direction value objects with their file format.

r[position, layer] = mean_harmful[position, layer] - mean_harmless[position, layer]. Candidates are
stored as safetensors (float64) with a JSON sidecar that says where they came from; pickles are
never read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..errors import UserError
from ..fileio import atomic_write_bytes, atomic_write_json, read_json


@dataclass(frozen=True, eq=False)
class Direction:
    """One refusal direction r (unnormalised, float64) taken at block ``layer``'s input, ``position``."""

    vector: torch.Tensor  # [d_model]
    layer: int
    position: int
    model_id: str = ""

    @property
    def d_model(self) -> int:
        return int(self.vector.shape[-1])

    def unit(self) -> torch.Tensor:
        return self.vector / self.vector.norm()


@dataclass(frozen=True, eq=False)
class CandidateDirections:
    """All difference-in-means candidates: ``vectors`` [n_positions, n_layers, d_model] float64."""

    vectors: torch.Tensor
    positions: list[int]  # negative, e.g. [-5, -4, -3, -2, -1]
    meta: dict = field(default_factory=dict)  # model id/revision, site, n prompts, data hashes

    @property
    def n_layers(self) -> int:
        return int(self.vectors.shape[1])

    @property
    def d_model(self) -> int:
        return int(self.vectors.shape[2])

    def get(self, position: int, layer: int) -> Direction:
        check_position_layer(position, layer, self.positions, self.n_layers, self.meta.get("model_id", "model"))
        return Direction(self.vectors[self.positions.index(position), layer].clone(), layer, position,
                         self.meta.get("model_id", ""))


def check_position_layer(position: int, layer: int, positions: list[int], n_layers: int, model_id: str) -> None:
    problems = []
    if not 0 <= layer < n_layers:
        problems.append(f"layer={layer} is out of range for {model_id} ({n_layers} layers: 0..{n_layers - 1})")
    if position not in positions:
        problems.append(f"position={position} is not a post-instruction position of {model_id} "
                        f"(valid: {positions[0]}..{positions[-1]})")
    if problems:
        raise UserError("; ".join(problems))


def diff_in_means(mean_harmful: torch.Tensor, mean_harmless: torch.Tensor, meta: dict | None = None
                  ) -> CandidateDirections:
    """Candidates from the two [n_positions, n_layers, d_model] means."""
    assert mean_harmful.shape == mean_harmless.shape, (mean_harmful.shape, mean_harmless.shape)
    n_pos = mean_harmful.shape[0]
    return CandidateDirections((mean_harmful.double() - mean_harmless.double()).cpu(),
                               list(range(-n_pos, 0)), dict(meta or {}))


def save_candidates(c: CandidateDirections, path: str | Path) -> Path:
    """Write ``path`` (.safetensors) and its ``.json`` sidecar."""
    path = Path(path)
    meta = {**c.meta, "positions": c.positions, "shape": list(c.vectors.shape),
            "axes": ["position", "layer", "d_model"], "site": "resid_pre", "method": "difference_in_means"}
    atomic_write_bytes(path, _safetensors_bytes({"candidates": c.vectors.contiguous()}))
    atomic_write_json(path.with_suffix(".json"), meta)
    return path


def load_candidates(path: str | Path) -> CandidateDirections:
    path = _check_safetensors_path(path)
    meta = _read_sidecar(path)
    vectors = _read_tensor(path, "candidates", 3, "[n_positions, n_layers, d_model]")
    positions = meta.get("positions", list(range(-vectors.shape[0], 0)))
    if not isinstance(positions, list) or len(positions) != vectors.shape[0] or \
            not all(isinstance(p, int) and p < 0 for p in positions):
        raise UserError(f"sidecar {path.with_suffix('.json')}: 'positions' {positions!r} does not match the "
                        f"{vectors.shape[0]} positions of {path}; delete both files to recompute")
    check_finite_direction(vectors, f"candidates file {path}")
    return CandidateDirections(vectors, positions, meta)


def check_finite_direction(vector: torch.Tensor, where: str, nonzero: bool = False) -> None:
    """A direction (or candidates) with NaN/inf entries, or a zero direction, stops the run (exit 2)."""
    bad = ~torch.isfinite(vector)
    if bad.any():
        raise UserError(f"{where} has {int(bad.sum())} non-finite value(s) (NaN or infinity); the activations "
                        "overflowed or the file is damaged. Re-run extraction (with --dtype float32 on half precision)")
    if nonzero and float(vector.double().norm()) == 0.0:
        raise UserError(f"{where} is the zero vector, so it has no direction (harmful and harmless means are "
                        "identical: a placeholder tokenizer, or identical instruction sets?); check the model's "
                        "tokenizer and the instruction sets")


def save_direction(d: Direction, path: str | Path, meta: dict | None = None) -> Path:
    path = Path(path)
    sidecar = {**(meta or {}), "model_id": d.model_id, "layer": d.layer, "position": d.position,
               "d_model": d.d_model, "norm": float(d.vector.norm()), "site": "resid_pre",
               "method": "difference_in_means"}
    atomic_write_bytes(path, _safetensors_bytes({"direction": d.vector.double().contiguous()}))
    atomic_write_json(path.with_suffix(".json"), sidecar)
    return path


def load_direction(path: str | Path, model_id: str | None = None, d_model: int | None = None) -> Direction:
    """Load a direction; when ``model_id``/``d_model`` are given they must match the file."""
    path = _check_safetensors_path(path)
    meta = _read_sidecar(path)
    vector = _read_tensor(path, "direction", 1, "[d_model]")
    check_finite_direction(vector, f"direction file {path}", nonzero=True)
    for key in ("layer", "position"):
        if key in meta and (isinstance(meta[key], bool) or not isinstance(meta[key], int)):
            raise UserError(f"sidecar {path.with_suffix('.json')}: {key}={meta[key]!r} is not an integer; fix it")
    if d_model is not None and vector.shape[-1] != d_model:
        raise UserError(f"direction file {path} has d_model {vector.shape[-1]} but the model has {d_model}; "
                        "use a direction extracted from this model")
    if model_id and meta.get("model_id") and meta["model_id"] != model_id:
        raise UserError(f"direction file {path} was extracted from {meta['model_id']!r}, not {model_id!r}; "
                        "re-run extraction for this model (or pass the matching --model)")
    return Direction(vector, int(meta.get("layer", -1)), int(meta.get("position", 0)), meta.get("model_id", ""))


def _safetensors_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save(tensors)


def _check_safetensors_path(path: str | Path) -> Path:
    path = Path(path)
    if path.suffix in (".pt", ".pth", ".pkl", ".pickle", ".bin"):
        raise UserError(f"{path} is a pickle-based file; refusing to load it (pickles can run code). "
                        "Convert it to .safetensors (safetensors.torch.save_file) and pass that")
    if not path.is_file():
        raise UserError(f"direction file {path} does not exist")
    return path


def _read_tensor(path: Path, key: str, ndim: int, shape: str) -> torch.Tensor:
    """The tensor ``key`` of a safetensors file, with ``ndim`` dimensions; `UserError` for anything else."""
    from safetensors import SafetensorError

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise UserError(f"{path} is not a readable safetensors file ({str(exc).splitlines()[0][:200]}); pass a file "
                        "written by refusal-direction (save_direction / a run's direction.safetensors)") from exc
    if key not in tensors:
        raise UserError(f"{path} has no tensor named {key!r} (found {sorted(tensors)}); pass a file written by "
                        f"refusal-direction, or re-save yours with the key {key!r}")
    tensor = tensors[key]
    if tensor.dim() != ndim or not tensor.is_floating_point():
        raise UserError(f"{path}: tensor {key!r} has shape {list(tensor.shape)} ({tensor.dtype}); expected a "
                        f"floating-point {shape} tensor")
    return tensor


def _read_sidecar(path: Path) -> dict:
    side = path.with_suffix(".json")
    if not side.is_file():
        return {}
    return read_json(side, "sidecar", fix="delete or fix it")


__all__ = ["Direction", "CandidateDirections", "diff_in_means", "save_candidates", "load_candidates",
           "save_direction", "load_direction", "check_position_layer", "check_finite_direction"]
