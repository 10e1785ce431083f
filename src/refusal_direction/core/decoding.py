"""Greedy decoding: settings, stop tokens, and the paper's path (HF ``generate`` with hooks), left-padded.

The fast CUDA path is `accel.fast_generation`; `generation.generate_all` chooses between the two. Greedy
means argmax at every step: sampling, temperature, top-k/p and repetition penalties are all switched off
explicitly, whatever the model's own generation config says. Stopping at the end-of-turn token is an
explicit option (the paper's code stopped only at ``<eos>`` and so let ~10% of gemma-2b-it's
completions run past ``<end_of_turn>``); decoding skips special tokens, as the paper's code did.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Sequence

import torch

from ..config import RunConfig
from .batching import run_batched
from .hooks import Intervention, apply_intervention
from .model import LoadedModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationSettings:
    """Everything a generation call needs besides the model, prompts and interventions: one value, passed whole.

    ``step`` defaults to ``"hf"`` here and to ``"own"`` in a run (`RunConfig.decode_step`), for one reason: a run
    records its step in environment.json and refuses to resume on another one (in bf16 the two steps round
    differently), while a library call keeps no such record, so its default is the reference step, whose tokens
    are HF generate's (exactly so in float32). ``GenerationSettings.from_config`` takes a run's choice.
    """

    max_new_tokens: int = 512  # the paper's budget
    batch_size: int = 32  # prompts per batch (halved automatically on CUDA out-of-memory)
    stop_at_end_of_turn: bool = False  # paper: False (stops at <eos> only)
    backend: str = "auto"  # generation.BACKENDS: auto (the fast path on one CUDA device, else HF generate) | fast | hf
    step: str = "hf"  # the fast path's decode step: hf | own (accel.own_step); see above for the default
    progress: bool = False  # show progress bars

    @classmethod
    def from_config(cls, config: RunConfig, progress: bool = False) -> GenerationSettings:
        """A run's generation settings: its budget, batch size, stopping rule, backend and decode step."""
        return cls(config.max_new_tokens, config.batch_size, config.stop_at_end_of_turn,
                   config.generation_backend, config.decode_step, progress)

    def replace(self, **changes) -> GenerationSettings:
        """A copy with ``changes`` (e.g. ``max_new_tokens=32`` for selection's short answers)."""
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class Generated:
    text: str
    token_ids: list[int]  # new tokens up to and including the stop token, if any
    stopped: bool  # ended on a stop token before max_new_tokens


def stop_ids(lm: LoadedModel, settings: GenerationSettings) -> list[int]:
    return lm.end_of_turn_ids() if settings.stop_at_end_of_turn else lm.eos_ids()


def greedy_config(lm: LoadedModel, max_new_tokens: int, eos: list[int]):
    from transformers import GenerationConfig

    return GenerationConfig(
        max_new_tokens=max_new_tokens, min_new_tokens=0, do_sample=False, num_beams=1, temperature=None,
        top_p=None, top_k=None, repetition_penalty=1.0, no_repeat_ngram_size=0,
        eos_token_id=eos, pad_token_id=lm.tokenizer.pad_token_id, bos_token_id=lm.tokenizer.bos_token_id)


def trim(lm: LoadedModel, new_tokens: torch.Tensor, eos: list[int]) -> list[Generated]:
    """Cut each row after its first stop token and decode (special tokens skipped)."""
    out = []
    eos_set = set(eos)
    for row in new_tokens.tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in eos_set), None)
        ids = row if end is None else row[:end]
        out.append(Generated(lm.tokenizer.decode(ids, skip_special_tokens=True), ids, end is not None))
    return out


@torch.no_grad()
def generate_hf(
    lm: LoadedModel,
    instructions: Sequence[str],
    intervention: Intervention,
    settings: GenerationSettings = GenerationSettings(),
    progress: bool = False,
) -> list[Generated]:
    """Greedy completions with HF ``generate`` and hooks (the reference path)."""
    eos = stop_ids(lm, settings)
    config = greedy_config(lm, settings.max_new_tokens, eos)

    def step(batch):
        enc = lm.tokenize(list(batch))
        with apply_intervention(lm, intervention):
            seq = lm.model.generate(**enc, generation_config=config)
        return trim(lm, seq[:, enc["input_ids"].shape[1]:], eos)

    return run_batched(step, list(instructions), settings.batch_size,
                       desc=f"generate [{intervention.name}]", progress=progress)
