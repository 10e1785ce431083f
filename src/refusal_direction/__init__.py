"""refusal-direction: find, remove and add the refusal direction of a chat model (Arditi et al., 2024).

Python API (heavy modules are imported on first use)::

    from refusal_direction import load_model, mean_resid_pre, diff_in_means, DirectionalAblation, generate
"""

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "model", "LoadedModel": "model",
    "mean_resid_pre": "activations",
    "diff_in_means": "directions", "Direction": "directions", "CandidateDirections": "directions",
    "load_direction": "directions", "save_direction": "directions",
    "Baseline": "interventions", "DirectionalAblation": "interventions", "ActivationAddition": "interventions",
    "apply_intervention": "interventions",
    "generate": "generation", "GenerationSettings": "generation",
    "is_refusal": "scoring",
    "sample_sets": "data", "load_instructions": "data",
    "orthogonalize_weights_": "export",
    "RunConfig": "config", "build_config": "config",
}


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(name)


__all__ = sorted(_EXPORTS) + ["__version__"]
