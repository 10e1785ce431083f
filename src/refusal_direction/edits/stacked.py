"""Many interventions in one batch with one hook per site: the projection forms stacked row by row.

A batch that holds K conditions (row b under condition c(b)) could hook every condition at every site with a
per-row switch (`apply_intervention(lm, iv, rows)`): K hooks per site, each reading and writing the whole
batch, so a batch of K trials costs O(K · rows) per site. Interventions that are *projections* —

    y ← y − w_s Σ_j (y·q_j) q_j        at site s, for an orthonormal basis q_1..q_k and a weight w_s per site

(directional ablation: k = 1, w = 1 everywhere; subspace ablation: k ≤ K_MAX, w = 1; the per-layer kernel:
k = 1, w by writer and layer) — expose that form as ``Edit.projection(lm) -> (basis [k, d], {site: w})`` with
sites ``("resid_pre", l)``, ``("attn_out", l)``, ``("mlp_out", l)``. `apply_interventions` stacks them: one
[rows, k_max, d] tensor of per-row bases (zero rows where a condition has fewer vectors or none) and one
[rows] weight vector per site, one hook per site that does the projection of every row at once (a row whose
weight is 0 comes back exactly as it was). A type that is no projection but can stack its own instances
(``Edit.stack(lm, group, switches) -> handles``: the norm-preserving ablation's per-row writer scales) does so
when two or more share a batch. Every other intervention is hooked with its own per-row switch.

With a single projection-form condition the batch keeps the per-row switch path (`ablate`'s two kernels are
faster than a batched product with k = 1), so a stacked row and a switched row agree to rounding, not bit for
bit; on the CPU they are equal to ~1e-6 relative in float32 (tests/unit/test_stacked.py).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch

from ..core.hooks import SITES, follow, input_hook, output_hook
from ..core.model import LoadedModel
from .base import Edit, apply_intervention


def _stack(lm: LoadedModel, forms: Sequence[tuple], switches: Sequence[torch.Tensor]):
    """Per-row bases [rows, k_max, d] and per-site row weights {site: [rows]} (sites with a nonzero weight).

    Built on the host and copied to the device in two transfers (a copy from pageable host memory waits for the
    device's queue, so one per site would hold the host back before every batch)."""
    rows = switches[0].shape[0]
    k_max = max(basis.shape[0] for basis, _ in forms)
    on_all = torch.stack([sw.detach() for sw in switches]).cpu().bool()  # [n_forms, rows], one transfer
    bases = torch.zeros(rows, k_max, lm.d_model, dtype=torch.float32)
    sites: dict[tuple[str, int], int] = {}
    entries: list[tuple[int, torch.Tensor, float]] = []
    for (basis, site_w), on in zip(forms, on_all, strict=True):
        bases[on, :basis.shape[0]] = basis.float().cpu()
        for site, w in site_w.items():
            if w:
                entries.append((sites.setdefault(site, len(sites)), on, float(w)))
    table = torch.zeros(len(sites), rows, dtype=torch.float32)
    for i, on, w in entries:
        table[i, on] = w
    device, dtype = lm.device, lm.dtype
    table = table.to(device=device, dtype=dtype)
    return bases.to(device=device, dtype=dtype), {site: table[i] for site, i in sites.items()}


def project_rows(x: torch.Tensor, bases: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x − w_b Σ_j (x·q_bj) q_bj per batch row: x [rows, ..., d], bases [rows, k, d], w [rows]."""
    b, d = x.shape[0], x.shape[-1]
    flat = x.reshape(b, -1, d)  # [rows, T, d]
    proj = torch.bmm(flat, bases.transpose(1, 2)) * w.view(b, 1, 1)  # [rows, T, k]
    return (flat - torch.bmm(proj, bases)).view_as(x)


def _groups(edits: Sequence[Edit], done: set) -> dict:
    """{class: indices} of the not yet stacked edits, two or more of one class (each class's ``stack`` decides)."""
    groups: dict = {}
    for i, edit in enumerate(edits):
        if i not in done:
            groups.setdefault(type(edit), []).append(i)
    return {k: v for k, v in groups.items() if len(v) > 1}


def _hook_stacked(lm: LoadedModel, bases: torch.Tensor, weights: dict) -> list:
    handles = []
    for (site, layer), w in weights.items():
        at = follow(lm, bases, w)

        def fn(x, at=at):
            return project_rows(x, *at(x))

        blk = lm.blocks[layer]
        if site == "resid_pre":
            handles.append(blk.block.register_forward_pre_hook(input_hook(fn), with_kwargs=True))
        else:
            module = blk.attn_out if site == "attn_out" else blk.mlp_out
            handles.append(module.register_forward_hook(output_hook(fn)))
    return handles


@contextlib.contextmanager
def apply_interventions(lm: LoadedModel, interventions: Sequence, switches: Sequence[torch.Tensor]
                        ) -> Iterator[dict]:
    """Hook every intervention on its rows (``switches[i]`` [rows]: 1 where intervention i applies); yields
    {"stacked": n, "switched": m}: how many were stacked into one hook per site, how many hooked one by one."""
    forms = [iv.projection(lm) for iv in interventions]
    stack_idx = [i for i, f in enumerate(forms) if f is not None] if sum(f is not None for f in forms) > 1 else []
    handles = []
    with contextlib.ExitStack() as stack:
        try:
            if stack_idx:
                bases, weights = _stack(lm, [forms[i] for i in stack_idx], [switches[i] for i in stack_idx])
                handles += _hook_stacked(lm, bases, weights)
            done = set(stack_idx)
            for kind, idx in _groups(interventions, done).items():  # e.g. norm-preserving ablations
                got = kind.stack(lm, [interventions[i] for i in idx], [switches[i] for i in idx])
                if got is not None:
                    handles += got
                    done.update(idx)
            for i, (iv, switch) in enumerate(zip(interventions, switches, strict=True)):
                if i not in done:
                    stack.enter_context(apply_intervention(lm, iv, rows=switch))
            yield {"stacked": len(done), "switched": len(interventions) - len(done)}
        finally:
            for h in handles:
                h.remove()


__all__ = ["SITES", "project_rows", "apply_interventions"]
