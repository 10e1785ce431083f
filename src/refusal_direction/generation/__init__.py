"""Generation: greedy completions under interventions, through one backend dispatcher.

`generate_all` is the only place that chooses between the fast CUDA path (`accel.fast_generation`: every
condition in one batch) and the paper's path (`core.decoding.generate_hf`: HF ``generate`` with hooks, one
condition at a time); `generate` is its one-intervention form.
"""

from __future__ import annotations

import logging
from typing import Sequence

from ..core.decoding import Generated, GenerationSettings, generate_hf
from ..core.model import LoadedModel
from ..edits import Intervention

log = logging.getLogger(__name__)

BACKENDS = ("auto", "fast", "hf")

__all__ = ["BACKENDS", "Generated", "GenerationSettings", "choose_backend", "generate", "generate_all",
           "generate_sets"]


def choose_backend(lm: LoadedModel, backend: str = "auto") -> str:
    """``"fast"`` or ``"hf"``: ``auto`` takes the fast path when the model sits on one CUDA device, HF generate
    elsewhere. A model dispatched over several devices (``--device-map``) always takes HF generate, with the
    reason logged, also when ``"fast"`` was asked for: the fast path's static cache and CUDA graphs need every
    weight on one GPU."""
    if backend not in BACKENDS:
        raise ValueError(f"generation backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if backend == "hf":
        return "hf"
    if lm.placement:
        log.info("generation: HF generate, not the fast path: the model is %s (the fast path needs one GPU)",
                 lm.placement)
        return "hf"
    if backend == "auto":
        return "fast" if lm.device.type == "cuda" else "hf"
    return backend


def generate_all(
    lm: LoadedModel,
    instructions: Sequence[str],
    interventions: Sequence[Intervention],
    settings: GenerationSettings = GenerationSettings(),
    on_done=None,
) -> dict[str, list[Generated]]:
    """Greedy completions of ``instructions`` under each intervention: {intervention name: completions}.

    ``settings`` carries the budget, batch size, stopping rule, backend, the fast path's decode step and whether
    to show progress (`GenerationSettings.from_config` for a run's). ``on_done(name, completions, seconds)`` is
    called as each condition finishes (on the fast path all finish together and the seconds are the shared
    batch's).
    """
    import time

    if choose_backend(lm, settings.backend) == "fast":
        from ..accel import generate_fast

        t0 = time.perf_counter()
        out = generate_fast(lm, instructions, interventions, settings, settings.progress, step=settings.step)
        if on_done is not None:
            for name, gens in out.items():
                on_done(name, gens, time.perf_counter() - t0)
        return out
    out = {}
    for iv in interventions:
        t0 = time.perf_counter()
        out[iv.name] = generate_hf(lm, instructions, iv, settings, settings.progress)
        if on_done is not None:
            on_done(iv.name, out[iv.name], time.perf_counter() - t0)
    return out


def generate_sets(
    lm: LoadedModel,
    sets: Sequence[tuple[Sequence[str], Sequence[Intervention]]],
    settings: GenerationSettings = GenerationSettings(),
    on_done=None,
    partial=None,
) -> list[dict[str, list[Generated]]]:
    """Several prompt sets, each under its own interventions: per set, {intervention name: completions}.

    On the fast path every set's rows share one batch (one decode loop; an intervention object passed to
    several sets is one condition); on HF generate the sets run one after another, a condition at a time.
    ``on_done(set index, name, completions, seconds)`` is called as each (set, condition) finishes.
    ``partial`` (`accel.partial.PartialResults`): on the fast path, where each finished batch's rows are kept
    and from where an interrupted call's rows are taken instead of being decoded again."""
    import time

    if choose_backend(lm, settings.backend) == "fast":
        from ..accel import generate_fast_sets

        t0 = time.perf_counter()
        extra = {"step": settings.step} if partial is None else {"partial": partial, "step": settings.step}
        out = generate_fast_sets(lm, [(list(ins), list(ivs)) for ins, ivs in sets], settings, settings.progress,
                                 **extra)
        if on_done is not None:
            for k, per_set in enumerate(out):
                for name, gens in per_set.items():
                    on_done(k, name, gens, time.perf_counter() - t0)
        return out
    out = []
    hf = settings.replace(backend="hf")
    for k, (instructions, ivs) in enumerate(sets):
        def done(name, gens, seconds, k=k):
            if on_done is not None:
                on_done(k, name, gens, seconds)
        out.append(generate_all(lm, instructions, ivs, hf, on_done=done))
    return out


def generate(
    lm: LoadedModel,
    instructions: Sequence[str],
    intervention: Intervention,
    settings: GenerationSettings = GenerationSettings(),
) -> list[Generated]:
    """Greedy completions under one intervention (`generate_all` with one condition)."""
    return generate_all(lm, instructions, [intervention], settings)[intervention.name]
