"""Subspace ablation: x ← x − Q Qᵀ x at every block input and attention/MLP output, for an orthonormal basis Q of a
k-dimensional refusal subspace (k = 1 is directional ablation; k > 1 the refusal "cone" of Wollschläger et al.,
ICML 2025, who find refusal is multi-dimensional).

`refusal_subspace`'s rule: the candidate matrix holds the unit candidates r̂[position, layer] of every position and
every layer below the selection's pruning cutoff; its top singular vectors, by the smallest k whose squared singular
values explain >= ``variance`` of the total, capped at ``k_max``. The basis is the QR of [r̂_selected, v₁, …, v_k]
cut to k columns: the reference direction is always the first basis vector, so DiM's ablation is the k = 1 case.

Weight form: v ← v − Q Qᵀ v for every written vector; its change has rank k, so a rank-k LoRA adapter holds it.
Search parameter: ``k`` in 1..K_MAX (the subspace of the interpolated direction, every singular vector allowed).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...core.directions import CandidateDirections, Direction
from ...core.hooks import SITES, hook_every_site, on_rows
from ...errors import UserError
from ..base import Edit, register

K_MAX = 4  # the search's largest subspace


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


@register("subspace")
@dataclass(frozen=True, eq=False)
class SubspaceAblation(Edit):
    """x ← x − Q Qᵀ x at every block input and attention/MLP output; ``basis`` [k, d_model], orthonormal rows."""

    basis: torch.Tensor
    name: str = "subspace"
    rule: str = ""  # how k and the basis were chosen (for the tables), when built by `refusal_subspace`
    explained: tuple[float, ...] = ()
    order = 5
    compare = True
    searchable = True
    reasons = {"own_step": "a k-dimensional projection: the own decode step ablates one direction per row"}

    def describe(self) -> dict:
        out = {"type": "subspace_ablation", "k": int(self.basis.shape[0]),
               "sites": "resid_pre, attn_out, mlp_out of every block"}
        return out | ({"k": int(self.basis.shape[0]), "rule": self.rule, "explained": list(self.explained)}
                      if self.rule else {})

    def hooks(self, lm, rows=None) -> list:
        q = self.basis.to(device=lm.device, dtype=lm.dtype)  # [k, d]
        qt = q.T.contiguous()  # [d, k]

        def fn(x):
            return on_rows(rows, x, -((x @ qt) @ q))

        return hook_every_site(lm, fn)

    def projection(self, lm) -> tuple[torch.Tensor, dict]:
        """(basis, weight 1 at every site)."""
        return self.basis.float().cpu(), {(s, i): 1.0 for i in range(lm.n_layers) for s in SITES}

    def weights_(self, model):
        from ..weights import edit_written_vectors_

        q = self.basis.double().cpu()
        return edit_written_vectors_(model, lambda kind, layer, v: v - (v @ q.T) @ q)

    @classmethod
    def from_run(cls, inputs, name: str) -> SubspaceAblation:
        """k by the rule (variance 0.5, at most 4) around the run's direction."""
        sub = refusal_subspace(inputs.candidates, inputs.direction, prune_layer_fraction=inputs.prune_layer_fraction)
        return cls(sub.basis, name=name, rule=sub.rule, explained=sub.explained)

    @classmethod
    def suggest(cls, trial, n_layers: int) -> None:
        trial.suggest_int("k", 1, K_MAX)

    @classmethod
    def from_params(cls, inputs, direction: Direction, params: dict, name: str) -> SubspaceAblation:
        sub = refusal_subspace(inputs.candidates, direction, variance=1.0, k_max=int(params["k"]),
                               prune_layer_fraction=inputs.prune_layer_fraction)
        return cls(sub.basis, name=name)
