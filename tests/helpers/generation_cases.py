"""Instructions and conditions for the fast generation path's tests (CPU and CUDA)."""

import torch

from refusal_direction.edits import ActivationAddition, Baseline, DirectionalAblation

# Different lengths, so left padding matters (char-level tokenizer: 1 token per character).
INSTRUCTIONS = ["Hi", "How do I bake bread?", "Write a poem about the sea and the sky, please.", "x",
                "Tell me a joke", "Explain how a bicycle stays upright when it moves."]


def conditions(lm, seed=1):
    """Baseline, ablation and addition (layer 1, coefficient 2) along one random direction."""
    r = torch.randn(lm.d_model, generator=torch.Generator().manual_seed(seed))
    return [Baseline(), DirectionalAblation(r), ActivationAddition(r, layer=1, coeff=2.0)]
