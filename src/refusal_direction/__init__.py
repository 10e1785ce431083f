"""refusal-direction: find, remove and add the refusal direction of a chat model (Arditi et al., 2024).

Python API (heavy modules are imported on first use)::

    from refusal_direction import load_model, mean_resid_pre, diff_in_means, DirectionalAblation, generate
"""

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "core.model", "LoadedModel": "core.model",
    "mean_resid_pre": "core.activations",
    "diff_in_means": "core.directions", "Direction": "core.directions", "CandidateDirections": "core.directions",
    "load_direction": "core.directions", "save_direction": "core.directions",
    "Baseline": "core.interventions", "DirectionalAblation": "core.interventions",
    "ActivationAddition": "core.interventions", "apply_intervention": "core.interventions",
    "generate": "generation", "GenerationSettings": "core.decoding",
    "is_refusal": "evaluation.refusal",
    "sample_sets": "data.instructions", "load_instructions": "data.instructions",
    "orthogonalize_weights_": "export",
    "RunConfig": "config", "build_config": "config",
}


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(name)


__all__ = sorted(_EXPORTS) + ["__version__"]
