"""How much a model differs from BASE on harmless prompts: first-token KL (heretic's measure), multi-token KL and
cross-entropy on BASE's own answers.

"Model" is anything that produces logits with BASE's tokenizer: BASE under an edit's hooks (``model=base,
edit=...``), a separately loaded HF model or merged LoRA (``model=other``), or another model under an edit. Every
function takes the two as ``(base, model, edit)``; BASE is always run without hooks.

**First-token KL, as heretic 1.4.0 computes it** (read from ``heretic/evaluator.py``, ``Evaluator.__init__`` and
``Evaluator.get_score``, and ``heretic/model.py``, ``Model.generate``, ``get_logprobs``, ``get_logprobs_batched``):

- prompts: ``mlabonne/harmless_alpaca``, split ``test[:100]``, column ``text`` (``good_evaluation_prompts``);
- template: ``[{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", ...}]`` through
  ``tokenizer.apply_chat_template(..., add_generation_prompt=True, tokenize=False)``; the text is then tokenized
  with the tokenizer's default ``add_special_tokens=True``, left-padded (pad = eos where the tokenizer has none);
  when heretic found a common prefix of the model's responses (``response_prefix``, e.g. a closed ``<think>``
  block), that text is appended to every prompt;
- position: ``generate(max_new_tokens=1, output_logits=True)``; the raw logits (not the processed scores) of the
  first generated token, i.e. the logits at the last prompt position;
- distribution: ``F.log_softmax(logits, dim=-1)`` over the full vocabulary (every column of the logits);
- KL: ``F.kl_div(model_logprobs, base_logprobs, reduction="batchmean", log_target=True)`` over all prompts at once
  (batches concatenated first) = Σ_prompts Σ_vocab p_base (log p_base − log p_model) / n_prompts, i.e.
  KL(base ‖ model) averaged over prompts. (``kl_div(input, target)`` is KL(target ‖ input).)

**Ours.** `first_token_logprobs` takes the log-softmax over the full vocabulary of the logits at the last prompt
position (`capability.last_token_logprobs`: float64, kept as float32 on the CPU, [n, vocab]); `first_token_kl`
calls the same ``F.kl_div(model, base, reduction="batchmean", log_target=True)`` in float64, and `per_prompt_kl` its
``reduction="none"`` form summed over the vocabulary, whose mean is the batch mean. The prompt format is the
model's own (`LoadedModel.format`: the chat template with no system turn, special tokens written once);
`with_system_prompt(lm)` gives heretic's system turn. Not reproduced: heretic's second BOS on templates that
write one themselves (Llama-3: ``add_special_tokens=True`` adds another) and its ``response_prefix``. Which prompts
the card uses is the caller's choice, stated there.

**Multi-token KL and CE** (`answer_scores`): BASE's answers (token ids, e.g. its greedy 128-token
``Generated.token_ids``, stop token included) are appended to the chat-formatted prompt and both models read
prompt + answer in one forward pass (teacher forcing). At each answer position t: KL(base ‖ model) of the
next-token distributions given prompt + answer[:t] (full vocabulary, float32), the model's NLL of answer[t] and
BASE's own. Answer position 0 is the first-token position, so its KL is the first-token KL of that prompt.
`damage` summarises: KL and CE per token over all answer tokens (Σ / Σ tokens), with prompt-level bootstrap
intervals of the ratio (`bootstrap.bootstrap_ratio`). Nothing holds more than one batch of distributions.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from ..core.batching import run_batched
from ..core.checks import pad_left
from ..core.model import LoadedModel, derive_chat_format
from ..core.padding import position_ids
from ..core.sdpa import restricted_sdpa
from ..edits import Baseline, Intervention, apply_intervention
from ..errors import UserError
from .bootstrap import bootstrap_ratio
from .capability import SDPA, Completion, completion_token_ids, last_token_logprobs

log = logging.getLogger(__name__)

HERETIC_SYSTEM_PROMPT = "You are a helpful assistant."  # heretic 1.4.0's default `system_prompt`
HERETIC_PROMPTS = "mlabonne/harmless_alpaca, split test[:100], column text"  # its `good_evaluation_prompts`

__all__ = ["AnswerScores", "DamageResult", "Estimate", "HERETIC_PROMPTS", "HERETIC_SYSTEM_PROMPT", "answer_scores",
           "damage", "first_token_kl", "first_token_logprobs", "per_prompt_kl", "shared_prompt_ids",
           "teacher_forced_logprobs", "with_system_prompt"]


def with_system_prompt(lm: LoadedModel, system: str = HERETIC_SYSTEM_PROMPT,
                       chat_template: str | None = None) -> LoadedModel:
    """``lm`` (the same module, not a copy) whose prompts carry a system turn ``system``, rendered by its chat
    template (``chat_template``: the template to use instead of the tokenizer's, e.g. a ``--chat-template`` file's)."""
    template = chat_template or getattr(lm.tokenizer, "chat_template", None)
    if not template:
        raise UserError(f"{lm.model_id} has no chat template to render a system prompt with; pass chat_template")
    wrapper = "{%- set messages = [{'role': 'system', 'content': " + json.dumps(system) + "}] + messages -%}"
    try:
        chat = derive_chat_format(lm.tokenizer, "", wrapper + template)
    except UserError as exc:
        raise UserError(f"the chat template of {lm.model_id} cannot take the system prompt {system!r} ({exc}); "
                        "compare without it (heretic cannot run such a model either)") from exc
    if chat.suffix != lm.chat.suffix:
        raise UserError(f"with a system prompt the chat template of {lm.model_id} ends the user turn differently "
                        f"({chat.suffix!r} vs {lm.chat.suffix!r}); compare without it")
    source = f"{chat.source} + system prompt {system!r}"
    return dataclasses.replace(lm, chat=dataclasses.replace(chat, source=source))


# --- first-token KL --------------------------------------------------------------------------------------------


def first_token_logprobs(lm: LoadedModel, prompts: Sequence[str], edit: Intervention | None = None,
                         batch_size: int = 32, progress: bool = False) -> torch.Tensor:
    """log p(first answer token) over the full vocabulary, per chat-formatted prompt: [n, vocab] float32, CPU."""
    iv = edit or Baseline()

    def step(batch):
        return list(last_token_logprobs(lm, batch, iv).float().cpu())  # rows of [batch, vocab]

    rows = run_batched(step, list(prompts), batch_size, desc=f"first-token logprobs [{iv.name}]", progress=progress)
    if not rows:
        raise ValueError("first_token_logprobs needs at least one prompt")
    return torch.stack(rows)


def _check_shapes(base_logprobs: torch.Tensor, model_logprobs: torch.Tensor) -> None:
    if base_logprobs.shape != model_logprobs.shape:
        raise UserError(f"log-probabilities of different shapes: base {tuple(base_logprobs.shape)}, model "
                        f"{tuple(model_logprobs.shape)}; compare models with the same vocabulary on the same prompts")


def kl_rows(base_logprobs: torch.Tensor, model_logprobs: torch.Tensor) -> torch.Tensor:
    """KL(base ‖ model) of each row [..., vocab] -> [...], in the inputs' dtype (``F.kl_div``, ``log_target``)."""
    model_logprobs = model_logprobs.to(base_logprobs.device)
    return F.kl_div(model_logprobs, base_logprobs, reduction="none", log_target=True).sum(-1)


def first_token_kl(base_logprobs: torch.Tensor, model_logprobs: torch.Tensor) -> float:
    """heretic's measure: ``F.kl_div(model, base, reduction="batchmean", log_target=True)`` of [n, vocab] log-probs,
    in float64 = mean over prompts of Σ p_base (log p_base − log p_model)."""
    _check_shapes(base_logprobs, model_logprobs)
    base, model = base_logprobs.double(), model_logprobs.double().to(base_logprobs.device)
    return float(F.kl_div(model, base, reduction="batchmean", log_target=True))


def per_prompt_kl(base_logprobs: torch.Tensor, model_logprobs: torch.Tensor) -> list[float]:
    """KL(base ‖ model) of each prompt (float64); their mean is `first_token_kl`."""
    _check_shapes(base_logprobs, model_logprobs)
    return kl_rows(base_logprobs.double(), model_logprobs.double()).tolist()


# --- teacher-forced answers ------------------------------------------------------------------------------------


def shared_prompt_ids(base: LoadedModel, model: LoadedModel, prompts: Sequence[str]) -> list[list[int]]:
    """The token ids of each chat-formatted prompt, which must be the same for both models."""
    ids = [base.encode(p) for p in prompts]
    if model is base:
        return ids
    for i, p in enumerate(prompts):
        other = model.encode(p)
        if other != ids[i]:
            at = next((k for k, (a, b) in enumerate(zip(ids[i], other)) if a != b), min(len(ids[i]), len(other)))
            raise UserError(
                f"{base.model_id} and {model.model_id} tokenize chat prompt {i} ({p[:40]!r}) differently "
                f"({len(ids[i])} vs {len(other)} tokens, first difference at token {at}); KL and CE need one "
                "tokenizer and one chat format: load the model with BASE's tokenizer and chat template")
    return ids


@torch.no_grad()
def teacher_forced_logprobs(lm: LoadedModel, prompt_ids: Sequence[list[int]], answer_ids: Sequence[list[int]],
                            edit: Intervention | None = None) -> torch.Tensor:
    """log p(· | prompt_i + answer_i[:t]) for every answer i and t = 0 .. T_i − 1, from one forward pass of the
    batch: [Σ T_i, vocab] float32, answers in order."""
    enc = pad_left(lm.tokenizer, [list(p) + list(a) for p, a in zip(prompt_ids, answer_ids, strict=True)],
                   lm.device)
    width = enc["input_ids"].shape[1]
    # left padding puts each answer at the end of its row; the logits at j predict token j + 1, so answer i's
    # T_i tokens are predicted at positions width − 1 − T_i .. width − 2
    keep = torch.zeros(enc["input_ids"].shape, dtype=torch.bool)  # [batch, seq]
    for b, a in enumerate(answer_ids):
        keep[b, width - 1 - len(a):width - 1] = True
    with apply_intervention(lm, edit or Baseline()), restricted_sdpa(lm.device, SDPA):
        logits = lm.model(**enc, position_ids=position_ids(enc["attention_mask"]), use_cache=False).logits
    return torch.log_softmax(logits[keep.to(logits.device)].float(), dim=-1)


@dataclass(frozen=True)
class AnswerScores:
    """One answer's per-token scores, position t predicting answer token t (nats)."""

    kl: tuple[float, ...]  # KL(base ‖ model) of the next-token distributions
    nll: tuple[float, ...]  # −log p_model(answer token)
    base_nll: tuple[float, ...]  # −log p_base(answer token)

    @property
    def n_tokens(self) -> int:
        return len(self.kl)


def _scores(base_lp: torch.Tensor, model_lp: torch.Tensor, answer_ids: Sequence[list[int]]) -> list[AnswerScores]:
    """Per-answer scores from the [Σ T_i, vocab] log-probs of both models."""
    _check_shapes(base_lp, model_lp)
    model_lp = model_lp.to(base_lp.device)
    target = torch.tensor([t for a in answer_ids for t in a], dtype=torch.long, device=base_lp.device)[:, None]
    kl = kl_rows(base_lp, model_lp).double().cpu()  # [Σ T_i]
    nll = (-model_lp.gather(-1, target)).squeeze(-1).double().cpu()
    base_nll = (-base_lp.gather(-1, target)).squeeze(-1).double().cpu()
    sizes = [len(a) for a in answer_ids]
    return [AnswerScores(tuple(k.tolist()), tuple(m.tolist()), tuple(b.tolist()))
            for k, m, b in zip(kl.split(sizes), nll.split(sizes), base_nll.split(sizes))]


def answer_scores(base: LoadedModel, model: LoadedModel, prompts: Sequence[str], answers: Sequence[Completion],
                  edit: Intervention | None = None, batch_size: int = 8,
                  progress: bool = False) -> list[AnswerScores]:
    """Per-token KL(base ‖ model), the model's NLL and BASE's NLL on BASE's ``answers`` (token ids, or text
    tokenized without special tokens), teacher-forced batch by batch; ``edit`` is applied to ``model`` only."""
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    prompt_ids = shared_prompt_ids(base, model, prompts)
    answer_ids = [completion_token_ids(base, a) for a in answers]
    same = model is base and edit is None  # the same forward pass twice: reuse it (KL exactly 0)

    def step(batch):
        p, a = [x[0] for x in batch], [x[1] for x in batch]
        base_lp = teacher_forced_logprobs(base, p, a)
        return _scores(base_lp, base_lp if same else teacher_forced_logprobs(model, p, a, edit), a)

    name = (edit or Baseline()).name
    return run_batched(step, list(zip(prompt_ids, answer_ids)), batch_size, desc=f"answer KL [{name}]",
                       progress=progress)


# --- the summary -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Estimate:
    """A value over prompts with its 95 % prompt-level bootstrap interval and the per-prompt values (None for a
    prompt without tokens)."""

    value: float | None
    ci95: tuple[float | None, float | None]
    per_prompt: tuple[float | None, ...]

    @classmethod
    def ratio(cls, sums: Sequence[float], counts: Sequence[int] | None = None) -> Estimate:
        """Σ sums / Σ counts (counts = 1 each: the mean over prompts) and its bootstrap interval."""
        b = bootstrap_ratio(list(sums), None if counts is None else list(counts))
        counts = [1] * len(sums) if counts is None else counts
        return cls(b["value"], tuple(b["ci95"]), tuple(s / n if n else None for s, n in zip(sums, counts)))


@dataclass(frozen=True)
class DamageResult:
    """How far ``model`` is from ``base`` on harmless prompts (nats)."""

    base: str  # BASE's model id
    model: str  # the model's id, with the edit's name when it ran under one
    chat_format: str  # where the prompt format came from (`ChatFormat.source`)
    first_token_kl: Estimate  # heretic's measure: mean over prompts of KL(base ‖ model) at the first answer token
    multi_token_kl: Estimate  # KL(base ‖ model) per token over all of BASE's answer tokens; per prompt: its mean
    ce: Estimate  # the model's NLL per token of BASE's answers
    base_ce: Estimate  # BASE's own NLL per token of its answers
    ce_increase: Estimate  # ce − base_ce, paired per prompt (Σ (nll − base_nll) / Σ tokens)
    n_prompts: int  # prompts of the first-token KL
    n_answers: int  # answers of the multi-token measures
    n_tokens: int  # answer tokens in all

    def to_json(self) -> dict:
        return dataclasses.asdict(self)  # tuples become lists in json.dumps


def _model_name(model: LoadedModel, edit: Intervention | None) -> str:
    return model.model_id if edit is None else f"{model.model_id} + {edit.name}"


def damage(base: LoadedModel, model: LoadedModel, prompts: Sequence[str], answers: Sequence[Completion],
           edit: Intervention | None = None, first_token_prompts: Sequence[str] | None = None,
           base_first_logprobs: torch.Tensor | None = None, batch_size: int = 8,
           progress: bool = False, system_prompt: str | None = None) -> DamageResult:
    """First-token KL on ``first_token_prompts`` (default: ``prompts``), and multi-token KL and CE on BASE's
    ``answers`` to ``prompts``, of ``model`` (under ``edit``) against ``base``.

    ``base_first_logprobs``: BASE's `first_token_logprobs` of those prompts, computed once for many models (with the
    same ``system_prompt``). ``system_prompt``: the first-token KL's prompts carry this system turn in both models
    (`with_system_prompt`; heretic's is `HERETIC_SYSTEM_PROMPT`); the answers are scored in the models' own format.
    """
    first_prompts = list(prompts if first_token_prompts is None else first_token_prompts)
    shared_prompt_ids(base, model, first_prompts)
    first_base, first_model = ((base, model) if system_prompt is None else
                               (with_system_prompt(base, system_prompt), with_system_prompt(model, system_prompt)))
    base_first = (first_token_logprobs(first_base, first_prompts, batch_size=batch_size, progress=progress)
                  if base_first_logprobs is None else base_first_logprobs)
    model_first = (base_first if model is base and edit is None else
                   first_token_logprobs(first_model, first_prompts, edit, batch_size=batch_size, progress=progress))
    scores = answer_scores(base, model, prompts, answers, edit, batch_size, progress)
    counts = [s.n_tokens for s in scores]
    nll, base_nll = [sum(s.nll) for s in scores], [sum(s.base_nll) for s in scores]
    result = DamageResult(
        base=base.model_id, model=_model_name(model, edit), chat_format=base.chat.source,
        first_token_kl=dataclasses.replace(Estimate.ratio(per_prompt_kl(base_first, model_first)),
                                           value=first_token_kl(base_first, model_first)),  # heretic's batch mean
        multi_token_kl=Estimate.ratio([sum(s.kl) for s in scores], counts),
        ce=Estimate.ratio(nll, counts), base_ce=Estimate.ratio(base_nll, counts),
        ce_increase=Estimate.ratio([m - b for m, b in zip(nll, base_nll)], counts),
        n_prompts=len(first_prompts), n_answers=len(scores), n_tokens=sum(counts))
    log.info("damage of %s vs %s: first-token KL %.4g, multi-token KL %.4g over %d tokens, CE %.4g (base %.4g)",
             result.model, result.base, result.first_token_kl.value or 0.0, result.multi_token_kl.value or 0.0,
             result.n_tokens, result.ce.value or 0.0, result.base_ce.value or 0.0)
    return result
