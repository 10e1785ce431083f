"""Methods beyond the paper's one direction, as interventions (hooks, per-row capable) and their parameters.

`interventions`: subspace, per-layer kernel, ACE (affine) ablation and addition, and the hook form of the
norm-preserving edit; `build`: the projected direction, the refusal subspace, the layer kernel, ACE's offset;
`cosmic`: cosine-similarity selection without generation. Weight forms live in `export.method_edits`.
"""

from .build import Subspace, ace_offset, layer_kernel, projected_direction, refusal_subspace
from .cosmic import CosmicResult, cosmic_select, reference_layers
from .interventions import (
    AffineAblation,
    AffineAddition,
    LayerKernelAblation,
    NormPreservingAblation,
    SubspaceAblation,
    WriterEdit,
)

__all__ = ["AffineAblation", "AffineAddition", "CosmicResult", "LayerKernelAblation", "NormPreservingAblation",
           "Subspace", "SubspaceAblation", "WriterEdit", "ace_offset", "cosmic_select", "layer_kernel",
           "projected_direction", "reference_layers", "refusal_subspace"]
