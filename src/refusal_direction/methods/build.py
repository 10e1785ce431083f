"""Building the methods' directions and parameters from the difference-in-means artifacts.

- `projected_direction`: r' = r − (r·μ̂) μ̂ with μ̂ the unit harmless mean at the direction's layer and
  position ("projected abliteration": the part of r that merely says "this is an activation like the
  harmless ones" is kept out of the edit).
- `refusal_subspace`: an orthonormal basis of a k-dimensional refusal subspace (Wollschläger et al., ICML
  2025, find refusal is a multi-dimensional cone). Rule: the candidate matrix holds the unit candidates
  r̂[position, layer] of every position and every layer below the selection's pruning cutoff; its top
  singular vectors, by the smallest k whose squared singular values explain >= ``variance`` of the total,
  capped at ``k_max``. The basis is the QR of [r̂_selected, v₁, …, v_k] cut to k columns: the reference
  direction is always the first basis vector, so DiM's ablation is the k = 1 case.
- `layer_kernel`: w(l) = w_min + (w_max − w_min) · max(0, 1 − |l − peak| / width), a triangular kernel.
- `ace_offset`: c = r̂·μ at a site, the projection ACE leaves in place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..core.directions import CandidateDirections, Direction
from ..errors import UserError


def projected_direction(direction: Direction, mean_harmless: CandidateDirections) -> Direction:
    """r with its component along the harmless mean (at r's layer and position) removed (float64)."""
    mu = mean_harmless.get(direction.position, direction.layer).vector.double()
    mu_hat = mu / mu.norm()
    r = direction.vector.double()
    return Direction(r - (r @ mu_hat) * mu_hat, direction.layer, direction.position, direction.model_id)


def ace_offset(direction: Direction, mean: CandidateDirections, layer: int | None = None) -> float:
    """r̂·μ of ``mean`` at the direction's position and ``layer`` (default: the direction's layer)."""
    mu = mean.get(direction.position, direction.layer if layer is None else layer).vector.double()
    return float(direction.unit().double() @ mu)


@dataclass(frozen=True)
class Subspace:
    """A refusal subspace: ``basis`` [k, d_model] float64 orthonormal rows, and how k was chosen."""

    basis: torch.Tensor
    explained: tuple[float, ...]  # cumulative variance share of the top singular vectors of the candidates
    rule: str

    @property
    def k(self) -> int:
        return int(self.basis.shape[0])


_SVD_CACHE: dict[tuple, tuple] = {}  # (id, version, shape, cutoff) of the candidates -> their SVD


def _candidate_svd(vectors: torch.Tensor, cutoff: int) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(rows used, singular values, right singular vectors) of the unit candidates of layers < ``cutoff``;
    computed once per candidates tensor (a search builds hundreds of subspaces from the same candidates)."""
    key = (id(vectors), vectors._version, tuple(vectors.shape), cutoff)
    hit = _SVD_CACHE.get(key)
    if hit is not None and hit[0] is vectors:
        return hit[1]
    rows = vectors[:, :cutoff].reshape(-1, vectors.shape[-1]).double()  # [n_pos * cutoff, d]
    rows = rows[rows.norm(dim=-1) > 1e-6 * rows.norm(dim=-1).max()]  # drop empty candidates (same token)
    rows = rows / rows.norm(dim=-1, keepdim=True)
    _, s, vh = torch.linalg.svd(rows, full_matrices=False)
    if len(_SVD_CACHE) >= 4:
        _SVD_CACHE.clear()
    _SVD_CACHE[key] = (vectors, (int(rows.shape[0]), s, vh))
    return int(rows.shape[0]), s, vh


def refusal_subspace(candidates: CandidateDirections, direction: Direction, variance: float = 0.5,
                     k_max: int = 4, prune_layer_fraction: float = 0.2) -> Subspace:
    """The k-dimensional subspace of the module docstring; ``variance`` in (0, 1], ``k_max`` >= 1."""
    if not 0 < variance <= 1 or k_max < 1:
        raise UserError(f"subspace rule needs 0 < variance <= 1 and k_max >= 1 (got {variance}, {k_max})")
    cutoff = max(1, int(candidates.n_layers * (1 - prune_layer_fraction)))
    n_rows, s, vh = _candidate_svd(candidates.vectors, cutoff)
    share = torch.cumsum(s ** 2, 0) / (s ** 2).sum()  # [rank]
    k = min(k_max, int((share < variance - 1e-12).sum()) + 1, int(vh.shape[0]))
    stacked = torch.cat([direction.unit().double()[None], vh[:k]], dim=0).T  # [d, k + 1]
    q, rr = torch.linalg.qr(stacked)
    keep = rr.diagonal().abs() > 1e-8 * rr.diagonal().abs().max()
    basis = (q[:, keep].T)[:k]  # [k, d]
    rule = (f"top singular vectors of {n_rows} unit candidates (positions x layers < {cutoff}); smallest k "
            f"explaining >= {variance:.0%} of the variance, capped at {k_max}; reference direction first")
    return Subspace(basis.contiguous(), tuple(float(x) for x in share[:max(k, 1)]), rule)


def layer_kernel(n_layers: int, peak: float, width: float, w_min: float = 0.0, w_max: float = 1.0
                 ) -> tuple[float, ...]:
    """Per-layer weights of the triangular kernel (module docstring); ``width`` > 0."""
    if width <= 0 or not math.isfinite(width):
        raise UserError(f"layer kernel width must be positive, got {width}")
    return tuple(w_min + (w_max - w_min) * max(0.0, 1 - abs(layer - peak) / width) for layer in range(n_layers))


__all__ = ["projected_direction", "ace_offset", "Subspace", "refusal_subspace", "layer_kernel"]
