"""Edits of the residual stream: one `Edit` class per method, each owning all its forms (hooks, stacked rows, the
own decode step's rows, weight edit, LoRA, description, construction from a run, search parameters).

- `base`: the `Edit` protocol, the registry (`register`, `registry`, `get_method`), `apply_intervention`;
- `stacked`: many edits in one batch, one hook per site (the hook primitives and sites are `core.hooks`);
- `weights`: the residual writers and the in-place edit of every written vector (`orthogonalize_weights_`);
- `methods/`: one file per method, registered by name (a new method is one file there and its test file).
"""

from ..core.hooks import SITES, Intervention, apply_intervention, per_row_interventions, unit
from .base import FORMS, Edit, EditInputs, NoWeightForm, RowForm, get_method, has_form, registry
from .methods.ace import AffineAblation, AffineAddition, ace_offset, embedding_gain
from .methods.addition import ActivationAddition
from .methods.baseline import Baseline
from .methods.composite import build, interpolated_direction, searchable, suggest
from .methods.cosmic import CosmicAblation, CosmicResult, cosmic_select, reference_layers
from .methods.directional import DirectionalAblation
from .methods.layer_kernel import LayerKernelAblation, kernel_weights, layer_kernel
from .methods.norm_preserving import NormPreservingAblation, WriterEdit, norm_preserving_ablation
from .methods.projected import ProjectedAblation, projected_direction
from .methods.subspace import K_MAX, Subspace, SubspaceAblation, refusal_subspace
from .stacked import apply_interventions, project_rows
from .weights import EditedWeights, edit_written_vectors_, find_residual_writers, orthogonalize_weights_

__all__ = ["FORMS", "K_MAX", "SITES", "ActivationAddition", "AffineAblation", "AffineAddition", "Baseline",
           "CosmicAblation", "CosmicResult", "DirectionalAblation", "Edit", "EditInputs", "EditedWeights",
           "Intervention", "LayerKernelAblation", "NoWeightForm", "NormPreservingAblation", "ProjectedAblation",
           "RowForm", "Subspace", "SubspaceAblation", "WriterEdit", "ace_offset", "apply_intervention",
           "apply_interventions", "build", "cosmic_select", "edit_written_vectors_", "embedding_gain",
           "find_residual_writers", "get_method", "has_form", "interpolated_direction", "kernel_weights",
           "layer_kernel", "norm_preserving_ablation", "orthogonalize_weights_", "per_row_interventions",
           "project_rows", "projected_direction", "reference_layers", "refusal_subspace", "registry", "searchable",
           "suggest", "unit"]
