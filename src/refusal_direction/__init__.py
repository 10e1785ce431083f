"""refusal-direction: find, remove and add the refusal direction of a chat model (Arditi et al., 2024).

Python API (heavy modules are imported on first use)::

    from refusal_direction import load_model, mean_resid_pre, diff_in_means, DirectionalAblation, generate
    from refusal_direction import build_config, replicate          # the commands: replicate, select, export_run, ...
"""

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "core.model", "LoadedModel": "core.model",
    "mean_resid_pre": "core.activations",
    "diff_in_means": "core.directions", "Direction": "core.directions", "CandidateDirections": "core.directions",
    "load_direction": "core.directions", "save_direction": "core.directions",
    "Baseline": "edits", "DirectionalAblation": "edits",
    "ActivationAddition": "edits", "apply_intervention": "edits", "Edit": "edits", "registry": "edits",
    "generate": "generation", "GenerationSettings": "core.decoding",
    "is_refusal": "evaluation.refusal",
    "sample_sets": "data.instructions", "load_instructions": "data.instructions",
    "orthogonalize_weights_": "edits",
    "RunConfig": "config", "build_config": "config",
    # the Python API under the commands: each returns a typed result that the CLI only prints
    "replicate": "run.pipeline", "ReplicateResult": "run.results",
    "select": "run.reselect",
    "export_run": "run.export", "verify_export": "run.export", "ExportResult": "run.results",
    "VerifyExportResult": "run.results",
    "compare": "run.compare", "optimize": "run.optimize",
    "Run": "run.rundir", "RunLayout": "run.layout",
}


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(name)


__all__ = sorted(_EXPORTS) + ["__version__"]
