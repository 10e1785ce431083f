"""Selection stage: score every candidate direction and pick one automatically (the paper's method).

For each candidate r = candidates[position, layer], on small validation sets:

- bypass score: mean refusal metric on harmful prompts with r ablated everywhere (lower = ablating r
  removes refusal better);
- induce score: mean refusal metric on harmless prompts with +r (raw, coefficient 1) added at block
  ``layer``'s input, every position (higher = adding r induces refusal);
- KL score: mean KL(baseline ‖ ablated) of the next-token distribution at the last prompt position
  on harmless prompts (how much ablating r changes harmless behaviour).

The refusal metric of one prompt is the log-odds that the first answer token is a refusal token:
p = Σ softmax(logits)[refusal ids] at the last position (float64), metric = log(p + ε) - log(1 - p + ε).

Filtering (defaults = the paper's): drop NaN scores, layers ≥ int(n_layers · (1 - 0.2)), KL > 0.1 and
induce < 0; the survivor with the lowest bypass score is the direction.

Speed: candidates are not scored one forward pass at a time. Every (candidate, prompt, kind) is one
row of a big batch; each row carries its own unit direction to ablate ([rows, d_model]) or its own
vector and layer to add. Rows are sorted by prompt length so a batch pads little, only the last position's
logits are computed, and the baseline distribution for the KL is computed once. An addition at block l leaves
blocks 0..l-1 as in the baseline, so induce rows start from the baseline's saved block-l input. The chat
template's opening tokens, the same in every prompt, are computed once per distinct intervention and handed to
the rows as keys and values. Two implementations of these passes (`_HFPasses`, `_FastPasses`):

- HF's forward with per-row hooks: any architecture; the reference. Each shortcut above is checked once
  against the model's own full passes and dropped (with a log line) if it does not reproduce them.
- `fast_forward.SweepDecoder`, the sweep's own forward for standard pre-norm decoders (Llama, Mistral, Qwen2,
  Gemma): no padding mask, the last block's MLP at the last position only, fused Triton kernels on CUDA. Used
  when it reproduces the reference on rows of every kind; kept per model until a weight changes.

gemma-2b-it shape on one H200, bf16, 90 candidates, 32 + 32 prompts: 1.81-1.86 s warm, 2.9-3.6 s first call in a
process (HF's forward with hooks: 2.54-2.94 s; one candidate at a time: 13-16 s); BENCHMARKS.md has the profile.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import logging
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, Sequence

import torch

from ..accel.fast_forward import RowInterventions, SweepDecoder, cat_interventions
from ..accel.fusion import fused_kernels, restricted_sdpa
from ..core.batching import run_batched
from ..core.directions import CandidateDirections
from ..core.interventions import ablate_rows, input_hook, output_hook
from ..core.model import LoadedModel
from ..core.padding import device_tensor
from ..errors import UserError

log = logging.getLogger(__name__)

EPS = 1e-8  # added inside both logs of the refusal metric, so p = 0 or 1 stays finite
REDUCE_ROWS = 256  # rows per float64 log-softmax (bounds memory at large vocabularies)
OPENING_BYTES = 2**30  # most memory for the openings' keys and values under every intervention (sweep forward)
PREFIX_GROUP_ROWS_FACTOR = 4  # induce rows per shared-prefix group = this x max_batch_rows (H200-tuned)

# Row kinds of the batched sweep.
BYPASS, INDUCE, KL = 0, 1, 2


# --------------------------------------------------------------------------------------------------
# Value objects


@dataclass(frozen=True)
class CandidateScore:
    """The three selection scores of the candidate at (position, layer)."""

    position: int
    layer: int
    bypass: float  # mean refusal metric, harmful val, candidate ablated (paper: refusal_score)
    induce: float  # mean refusal metric, harmless val, candidate added at `layer` (paper: steering_score)
    kl: float  # mean KL(baseline ‖ ablated), harmless val, last position (paper: kl_div_score)

    def has_nan(self) -> bool:
        return any(math.isnan(v) for v in (self.bypass, self.induce, self.kl))


@dataclass(frozen=True)
class SelectionThresholds:
    """Filters applied before choosing the lowest bypass score (defaults: the paper's)."""

    kl_threshold: float = 0.1  # discard candidates whose KL score is above this
    induce_threshold: float = 0.0  # discard candidates whose induce score is below this
    prune_layer_fraction: float = 0.2  # discard layers >= int(n_layers * (1 - this))

    def __post_init__(self):
        if not 0.0 <= self.prune_layer_fraction < 1.0:
            raise UserError(f"prune_layer_fraction={self.prune_layer_fraction} must be in [0, 1) "
                            "(0 keeps every layer; the paper uses 0.2)")

    def max_layer(self, n_layers: int) -> int:
        """First pruned layer: layers >= this are discarded."""
        return int(n_layers * (1.0 - self.prune_layer_fraction))


# Reasons a candidate is discarded (codes, as written to JSON).
NAN, LATE_LAYER, HIGH_KL, LOW_INDUCE = "nan", "late_layer", "kl", "induce"


@dataclass(frozen=True)
class SelectionResult:
    """The chosen candidate, the ordered survivors, and why every other candidate was discarded."""

    position: int
    layer: int
    survivors: tuple[CandidateScore, ...]  # ascending bypass score; survivors[0] is the choice
    discarded: tuple[tuple[CandidateScore, tuple[str, ...]], ...]  # (score, reason codes)
    thresholds: SelectionThresholds
    n_layers: int

    @property
    def chosen(self) -> CandidateScore:
        return self.survivors[0]

    @property
    def max_layer(self) -> int:
        return self.thresholds.max_layer(self.n_layers)


# --------------------------------------------------------------------------------------------------
# Refusal tokens and the refusal metric


def refusal_token_ids(tokenizer, words: Sequence[str] = ("I",), suffix: str = "") -> list[int]:
    """First token of each word as the model would begin its answer right after the chat ``suffix``.

    The word is encoded after the suffix and the first token past the suffix is taken, so a word that
    opens an answer encodes as it would there (gemma-2b-it: "I" -> 235285). When the suffix does not
    end in whitespace (e.g. Llama-2's ``[/INST]``), answers start with a space, so " word" is tried
    first (SentencePiece "▁I").
    """
    suffix_ids = tokenizer(suffix, add_special_tokens=False)["input_ids"] if suffix else []
    ids: list[int] = []
    for word in words:
        variants = [" " + word, word] if suffix and not suffix[-1].isspace() else [word]
        token = None
        for text in variants:
            full = tokenizer(suffix + text, add_special_tokens=False)["input_ids"]
            rest = full[len(suffix_ids):] if full[:len(suffix_ids)] == suffix_ids else \
                tokenizer(text, add_special_tokens=False)["input_ids"]
            if rest and tokenizer.decode([rest[0]]).strip():
                token = int(rest[0])
                break
        if token is None:
            raise UserError(f"refusal word {word!r} does not tokenize to a visible first token; "
                            "pass other refusal words (or explicit refusal token ids)")
        if token not in ids:
            ids.append(token)
    log.info("refusal tokens: %s", [(i, tokenizer.decode([i])) for i in ids])
    return ids


def default_refusal_ids(lm: LoadedModel) -> list[int]:
    return refusal_token_ids(lm.tokenizer, ("I",), lm.chat.suffix)


def refusal_metric(logits_last: torch.Tensor, refusal_ids: Sequence[int]) -> torch.Tensor:
    """Log-odds of a refusal token: logits [batch, vocab] -> [batch] float64."""
    return _metric_from_logprobs(torch.log_softmax(logits_last.double(), dim=-1), refusal_ids)


def _metric_from_logprobs(logprobs: torch.Tensor, refusal_ids: Sequence[int]) -> torch.Tensor:
    ids = device_tensor(list(refusal_ids), logprobs.device)
    p = logprobs.index_select(-1, ids).exp().sum(-1)  # [batch] float64
    return torch.log(p + EPS) - torch.log(1.0 - p + EPS)


# --------------------------------------------------------------------------------------------------
# Per-row interventions (each batch row has its own direction)


@contextlib.contextmanager
def per_row_interventions(
    lm: LoadedModel,
    ablate_dirs: torch.Tensor | None = None,
    add_vectors: torch.Tensor | None = None,
    add_layers: Sequence[int] | None = None,
) -> Iterator[None]:
    """Hook per-row interventions into ``lm.model`` for one batch.

    ``ablate_dirs`` [batch, d_model]: unit direction ablated from row b at every block input and every
    attention/MLP output (a zero row leaves that row untouched). ``add_vectors`` [batch, d_model] with
    ``add_layers`` [batch] (-1 = none): vector added to row b at the input of block ``add_layers[b]``.
    """
    handles = []
    try:
        if ablate_dirs is not None:
            def fn_ablate(x):
                return ablate_rows(x, ablate_dirs)

            for site in lm.blocks:
                handles.append(site.block.register_forward_pre_hook(input_hook(fn_ablate), with_kwargs=True))
                handles.append(site.attn_out.register_forward_hook(output_hook(fn_ablate)))
                handles.append(site.mlp_out.register_forward_hook(output_hook(fn_ablate)))
        if add_vectors is not None:
            layers = device_tensor(list(add_layers), add_vectors.device)  # [batch]
            for layer in sorted(set(add_layers) - {-1}):
                vec = torch.where((layers == layer).unsqueeze(-1), add_vectors, 0)  # [batch, d]

                def fn_add(x, vec=vec):
                    return x + vec.unsqueeze(1)

                handles.append(lm.blocks[layer].block.register_forward_pre_hook(input_hook(fn_add),
                                                                                with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


# --------------------------------------------------------------------------------------------------
# Forward passes that keep only the last position


@functools.cache
def _accepts_logits_to_keep(model_type: type) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model_type.forward).parameters
    except (TypeError, ValueError):
        return False


def _tokenize_each(lm: LoadedModel, instructions: Sequence[str]) -> list[list[int]]:
    """Chat-formatted token ids per instruction, unpadded (padding happens per batch)."""
    return lm.tokenizer([lm.format(x) for x in instructions], add_special_tokens=False)["input_ids"]


def _left_pad(seqs: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``input_ids`` and ``attention_mask`` [batch, max_len], as tokenize_prompts makes them."""
    width = max(len(s) for s in seqs)
    ids = [[pad_id] * (width - len(s)) + list(s) for s in seqs]
    mask = [[0] * (width - len(s)) + [1] * len(s) for s in seqs]
    return device_tensor(ids, device), device_tensor(mask, device)


def _last_logits(lm: LoadedModel, seqs: Sequence[Sequence[int]], past=None, past_len: int = 0) -> torch.Tensor:
    """Next-token logits after each prompt: [batch, vocab] in the model's dtype.

    ``past``: a KV cache of ``past_len`` tokens that precede every sequence (`_opening_cache`); the sequences
    are then continuations, left-padded after the cached tokens with position ids that skip the padding.
    """
    input_ids, mask = _left_pad(seqs, lm.tokenizer.pad_token_id, lm.device)
    kwargs: dict = {"use_cache": False}
    if past is not None:
        position = past_len + (mask.cumsum(-1) - 1).clamp_min(0)  # the padding hole does not count
        mask = torch.cat([torch.ones_like(mask[:, :1]).expand(-1, past_len), mask], dim=1)
        kwargs = {"past_key_values": past, "position_ids": position, "use_cache": True}
    if not _accepts_logits_to_keep(type(lm.model)):
        return lm.model(input_ids=input_ids, attention_mask=mask, **kwargs).logits[:, -1, :]
    # logits_to_keep=1 hands the LM head a strided view [batch, 1, d]; on CUDA that runs as a batched
    # matrix-vector product that re-reads the whole unembedding per row (measured on an H200 at
    # gemma-2b shape, 1024 rows: 239 ms vs 1.5 ms). A contiguous copy makes it one matrix product.
    head = lm.model.get_output_embeddings()
    handle = None if head is None else \
        head.register_forward_pre_hook(lambda module, args: (args[0].contiguous(), *args[1:]))
    try:
        out = lm.model(input_ids=input_ids, attention_mask=mask, logits_to_keep=1, **kwargs)
    finally:
        if handle is not None:
            handle.remove()
    return out.logits[:, -1, :]


# --------------------------------------------------------------------------------------------------
# The chat template's opening (e.g. "<bos><start_of_turn>user\n", or a default system prompt) is the same
# tokens at the same positions in every prompt, and causal attention keeps its activations independent of
# what follows: under one intervention they are the same for every prompt. So they are computed once per
# distinct intervention in a batch and handed to the rows as a KV cache.


def common_opening(seqs: Sequence[Sequence[int]]) -> list[int]:
    """The longest token prefix shared by every sequence, leaving each at least one token of its own."""
    if not seqs:
        return []
    limit, first = min(len(s) for s in seqs) - 1, seqs[0]
    n = 0
    while n < limit and all(s[n] == first[n] for s in seqs):
        n += 1
    return list(first[:n])


def _opening_cache(lm: LoadedModel, opening: Sequence[int], n: int):
    """KV cache of ``opening`` for ``n`` rows, computed under whatever hooks are active (row i = intervention i).
    Runs the decoder alone where the model exposes it: no LM head for tokens whose logits nobody reads."""
    ids = device_tensor([list(opening)], lm.device).expand(n, -1)
    decoder = lm.model.get_decoder() if hasattr(lm.model, "get_decoder") else None
    return (decoder if isinstance(decoder, torch.nn.Module) else lm.model)(input_ids=ids,
                                                                          use_cache=True).past_key_values


def _opening_matches(lm: LoadedModel, opening: Sequence[int], seqs: Sequence[Sequence[int]],
                     logits: torch.Tensor) -> bool:
    """Whether continuing from the opening's cache reproduces full-pass ``logits`` for ``seqs`` (checks that
    this architecture takes a cache, position ids and a mask with a hole)."""
    def shared() -> torch.Tensor:
        cache = _opening_cache(lm, opening, 1)
        cache.reorder_cache(torch.zeros(len(seqs), dtype=torch.long, device=lm.device))
        return _last_logits(lm, [s[len(opening):] for s in seqs], cache, len(opening))

    return _reproduces_logits(lm, "shared chat-template opening", shared, logits)


def _reproduces_logits(lm: LoadedModel, what: str, compute, logits: torch.Tensor) -> bool:
    """Whether ``compute()`` (a shortcut) gives ``logits`` (the full pass) to 5 % relative error; logs why not."""
    try:
        got = compute()
    except Exception as exc:  # any architecture surprise: full passes
        log.info("%s unavailable for %s (%s: %s); using full forward passes", what, lm.model_id,
                 type(exc).__name__, exc)
        return False
    ref = logits.float()
    err = float((got.float() - ref).norm() / (ref - ref.mean(-1, keepdim=True)).norm().clamp_min(1e-30))
    if err > 5e-2:
        log.info("%s does not reproduce %s's logits (relative error %.3g); using full forward passes", what,
                 lm.model_id, err)
        return False
    log.debug("%s check: relative logit error %.3g", what, err)
    return True


# --------------------------------------------------------------------------------------------------
# Shared prefixes: an activation addition at block l leaves blocks 0..l-1 as in the baseline, so the
# induce rows start from the baseline's block-l input instead of running the whole model.


@dataclass(frozen=True, eq=False)
class _Prefix:
    """A baseline forward pass of ``batch`` prompts: every block's input and call arguments."""

    resid: list[torch.Tensor]  # per block: input hidden states [batch, seq, d_model]
    calls: list[tuple[tuple, dict]]  # per block: positional arguments after hidden_states, keyword arguments
    batch: int


def _capture_prefix(lm: LoadedModel, seqs: Sequence[Sequence[int]]) -> tuple[torch.Tensor, _Prefix]:
    """Last-position logits [batch, vocab] of an unintervened forward pass, and its _Prefix."""
    resid: list = [None] * lm.n_layers
    calls: list = [None] * lm.n_layers

    def make_hook(layer: int):
        def hook(module, args, kwargs):
            kwargs = dict(kwargs)
            x = args[0] if args else kwargs.pop("hidden_states")
            resid[layer] = x.detach().clone()
            calls[layer] = (tuple(args[1:]), kwargs)
        return hook

    handles = [site.block.register_forward_pre_hook(make_hook(i), with_kwargs=True)
               for i, site in enumerate(lm.blocks)]
    try:
        logits = _last_logits(lm, seqs)
    finally:
        for h in handles:
            h.remove()
    return logits, _Prefix(resid, calls, len(seqs))


def _select_rows(obj, rows: torch.Tensor, batch: int):
    """Index the batch dimension of every per-row tensor in a block's call arguments."""
    if isinstance(obj, torch.Tensor):
        return obj.index_select(0, rows) if obj.dim() >= 2 and obj.shape[0] == batch else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_select_rows(o, rows, batch) for o in obj)
    if isinstance(obj, dict):
        return {k: _select_rows(v, rows, batch) for k, v in obj.items()}
    return obj


def _replay(lm: LoadedModel, prefix: _Prefix, prompts: Sequence[int], starts: Sequence[int],
            vectors: torch.Tensor) -> torch.Tensor:
    """Last-position logits [n, vocab] of row i = prompt ``prompts[i]`` of ``prefix`` with ``vectors[i]``
    added at block ``starts[i]``'s input; blocks before ``starts[i]`` are not recomputed."""
    order = sorted(range(len(prompts)), key=lambda i: starts[i])
    h, active, nxt = None, [], 0
    for layer in range(starts[order[0]], lm.n_layers):
        joining = []
        while nxt < len(order) and starts[order[nxt]] == layer:
            joining.append(order[nxt])
            nxt += 1
        if joining:
            x = prefix.resid[layer].index_select(0, device_tensor([prompts[i] for i in joining], lm.device))
            x = x + vectors.index_select(0, device_tensor(joining, lm.device)).unsqueeze(1)  # [n_join, seq, d]
            h = x if h is None else torch.cat([h, x])
            active += joining
            rows = device_tensor([prompts[i] for i in active], lm.device)
        args, kwargs = prefix.calls[layer]
        out = lm.blocks[layer].block(h, *_select_rows(args, rows, prefix.batch),
                                     **_select_rows(kwargs, rows, prefix.batch))
        h = out[0] if isinstance(out, tuple) else out
    logits = lm.model.get_output_embeddings()(lm.final_norm(h[:, -1:, :]).contiguous())[:, -1, :]
    cap = getattr(lm.model.config.get_text_config(), "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    out = torch.empty_like(logits)
    out[device_tensor(active, lm.device)] = logits
    return out


def _replay_matches(lm: LoadedModel, prefix: _Prefix, logits: torch.Tensor) -> bool:
    """Whether replaying the baseline from block 0 reproduces the model's own logits (checks that the
    block arguments, the final norm and the head were found right for this architecture)."""
    if lm.final_norm is None or lm.model.get_output_embeddings() is None:
        log.info("shared-prefix replay unavailable for %s (no final norm or output embeddings found); using "
                 "full forward passes", lm.model_id)
        return False
    n = prefix.batch
    zeros = torch.zeros(n, lm.d_model, device=lm.device, dtype=lm.dtype)
    return _reproduces_logits(lm, "shared-prefix replay", lambda: _replay(lm, prefix, list(range(n)), [0] * n, zeros),
                              logits)


@torch.no_grad()
def refusal_metrics(
    lm: LoadedModel,
    instructions: Sequence[str],
    refusal_ids: Sequence[int] | None = None,
    batch_size: int = 32,
    progress: bool = False,
) -> torch.Tensor:
    """Unintervened refusal metric of each instruction: [n] float64 on CPU."""
    refusal_ids = list(refusal_ids) if refusal_ids is not None else default_refusal_ids(lm)
    seqs = _tokenize_each(lm, instructions)

    def step(batch):
        return refusal_metric(_last_logits(lm, batch), refusal_ids).cpu().tolist()

    return torch.tensor(run_batched(step, seqs, batch_size, "refusal metric", progress), dtype=torch.float64)


def filter_validation(
    lm: LoadedModel,
    harmful: Sequence[str],
    harmless: Sequence[str],
    refusal_ids: Sequence[int] | None = None,
    batch_size: int = 32,
) -> tuple[list[str], list[str]]:
    """Keep harmful instructions the model refuses (metric > 0) and harmless ones it does not (< 0)."""
    refusal_ids = list(refusal_ids) if refusal_ids is not None else default_refusal_ids(lm)
    m_harmful = refusal_metrics(lm, harmful, refusal_ids, batch_size)
    m_harmless = refusal_metrics(lm, harmless, refusal_ids, batch_size)
    kept_harmful = [x for x, m in zip(harmful, m_harmful.tolist()) if m > 0]
    kept_harmless = [x for x, m in zip(harmless, m_harmless.tolist()) if m < 0]
    log.info("validation filter: kept %d/%d harmful (refused) and %d/%d harmless (not refused)",
             len(kept_harmful), len(harmful), len(kept_harmless), len(harmless))
    if not kept_harmful or not kept_harmless:
        raise UserError(
            f"after filtering, {len(kept_harmful)} harmful and {len(kept_harmless)} harmless validation "
            f"instructions are left (harmful kept if the model refuses them, harmless if it does not; refusal "
            f"tokens {refusal_ids}); the model may not refuse, or its answers may not start with these "
            "tokens. Use more validation instructions, other refusal tokens, or select the direction by "
            "hand (--select fixed --layer L --position P)")
    return kept_harmful, kept_harmless


# --------------------------------------------------------------------------------------------------
# The sweep's forward passes: HF's forward with per-row hooks (any architecture; the reference), or
# `fast_forward.SweepDecoder` (standard pre-norm decoders; checked once against the reference). Both give
# last-position logits of rows where row i ablates candidate cands[i] everywhere, or adds it at its layer if
# induce[i]; the chat template's opening is computed once per distinct intervention in a batch.


def _distinct(cands: Sequence[int], induce: Sequence[bool]) -> tuple[list[tuple[int, bool]], list[int]]:
    """The distinct (candidate, induce) pairs of a batch, and each row's index among them."""
    distinct: dict[tuple[int, bool], int] = {}
    slot = [distinct.setdefault((c, a), len(distinct)) for c, a in zip(cands, induce)]
    return list(distinct), slot


def _row_interventions(unit_dirs, add_vecs, keys, cands: Sequence[int], induce: Sequence[bool]):
    """(directions to ablate [rows, d] or None, vectors to add [rows, d] or None, layer to add at per row, -1: none)
    for rows that ablate candidate cands[i], or add it at its layer if induce[i]."""
    cand = device_tensor(list(cands), unit_dirs.device)
    dirs = None if all(induce) else \
        unit_dirs[cand] * device_tensor([not a for a in induce], unit_dirs.device, unit_dirs.dtype).unsqueeze(-1)
    adds = add_vecs[cand] if any(induce) else None
    return dirs, adds, tuple(keys[c][1] if a else -1 for c, a in zip(cands, induce))


@dataclass(eq=False)
class _HFPasses:
    lm: LoadedModel
    unit_dirs: torch.Tensor  # [n_candidates, d] (zero rows: not ablatable)
    add_vecs: torch.Tensor  # [n_candidates, d]
    keys: list[tuple[int, int]]  # (position, layer) per candidate
    opening: list[int]
    name: str = "HF forward with per-row hooks"

    def _hooks(self, cands: Sequence[int], induce: Sequence[bool]):
        return per_row_interventions(self.lm, *_row_interventions(self.unit_dirs, self.add_vecs, self.keys, cands,
                                                                  induce))

    def rows(self, seqs, cands, induce) -> torch.Tensor:
        past = None
        if self.opening:
            distinct, slot = _distinct(cands, induce)
            with self._hooks(*zip(*distinct)):
                past = _opening_cache(self.lm, self.opening, len(distinct))
            past.reorder_cache(device_tensor(slot, self.lm.device))
            seqs = [s[len(self.opening):] for s in seqs]
        with self._hooks(cands, induce):
            return _last_logits(self.lm, seqs, past, len(self.opening))

    def baseline(self, seqs, capture: bool):
        return _capture_prefix(self.lm, seqs) if capture else (_last_logits(self.lm, seqs), None)

    def replay_matches(self, prefix, logits) -> bool:
        return _replay_matches(self.lm, prefix, logits)

    def replay(self, prefix: _Prefix, prompts, cands) -> torch.Tensor:
        vectors = self.add_vecs[device_tensor(list(cands), self.lm.device)]
        return _replay(self.lm, prefix, prompts, [self.keys[c][1] for c in cands], vectors)


@dataclass(eq=False)
class _FastPasses:
    decoder: SweepDecoder
    unit_dirs: torch.Tensor
    add_vecs: torch.Tensor
    keys: list[tuple[int, int]]
    opening: list[int]
    name: str = "sweep forward (fast_forward)"

    def __post_init__(self):
        # The opening under every intervention of the sweep, once: slot 0 none, 1 + c ablates candidate c,
        # 1 + n + c adds it at its layer (a few tokens for 2n + 1 rows: one small pass instead of one per batch)
        self.prefix = None
        d = self.decoder
        size = 2 * (2 * len(self.keys) + 1) * len(self.opening) * d.n_kv * d.head_dim * len(d.blocks) * \
            self.unit_dirs.element_size()
        if self.opening and size > OPENING_BYTES:
            log.info("the sweep forward recomputes the %d-token opening in every row: keeping it for all %d "
                     "interventions would take %.1f GiB", len(self.opening), 2 * len(self.keys) + 1, size / 2**30)
            self.opening = []
        if self.opening:
            n = len(self.keys)
            rows = self._interventions(list(range(n)) * 2, [False] * n + [True] * n)
            zero = RowInterventions(torch.zeros_like(self.unit_dirs[:1]), torch.zeros_like(self.add_vecs[:1]), (-1,))
            self.prefix = self.decoder.kv_prefix(self.opening, cat_interventions([zero, rows], [1, 2 * n],
                                                                                self.unit_dirs.shape[1],
                                                                                self.unit_dirs), 2 * n + 1)

    def _interventions(self, cands, induce) -> RowInterventions:
        return RowInterventions(*_row_interventions(self.unit_dirs, self.add_vecs, self.keys, cands, induce))

    def _slots(self, cands, induce) -> torch.Tensor | None:
        if self.prefix is None:
            return None
        n = len(self.keys)
        return device_tensor([1 + c + (n if a else 0) for c, a in zip(cands, induce)], self.unit_dirs.device)

    def rows(self, seqs, cands, induce) -> torch.Tensor:
        seqs = [s[len(self.opening):] for s in seqs]
        return self.decoder.last_logits(seqs, self._interventions(cands, induce), self.prefix,
                                        self._slots(cands, induce))

    def baseline(self, seqs, capture: bool):
        slots = None if self.prefix is None else torch.zeros(len(seqs), dtype=torch.long, device=self.unit_dirs.device)
        seqs = [s[len(self.opening):] for s in seqs]
        logits, resid, last = self.decoder.capture(seqs, self.prefix, slots)
        return logits, (resid, last, [len(s) for s in seqs]) if capture else None

    def replay_matches(self, prefix, logits) -> bool:
        return True  # checked with the rest of this path by _fast_matches

    def replay(self, prefix, prompts, cands) -> torch.Tensor:
        resid, last, lengths = prefix
        width = max(lengths[p] for p in prompts)  # right padding: positions past every row's end can go
        resid = [r[:, :width] for r in resid]
        starts = [self.keys[c][1] for c in cands]
        vectors = self.add_vecs[device_tensor(list(cands), self.unit_dirs.device)]
        return self.decoder.replay(resid, last, prompts, starts, vectors, self.prefix,
                                   self._slots(cands, [True] * len(cands)))


CHECKED_DECODER = "sweep_decoder"  # key in LoadedModel.extra: (weights key, settings, SweepDecoder that matched)


def _weights_key(model: torch.nn.Module) -> tuple:
    """Changes whenever a parameter is replaced or edited in place (e.g. by weight orthogonalization)."""
    return tuple((p.data_ptr(), p._version) for p in model.parameters())


def _choose_passes(lm: LoadedModel, unit_dirs, add_vecs, keys, opening: list[int], check: Sequence[Sequence[int]],
                   finite: torch.Tensor, fast_forward: bool, fuse: bool) -> _HFPasses | _FastPasses:
    """The sweep forward if it supports ``lm`` and matches HF's forward with hooks, else HF's forward (with the
    shared opening only if it reproduces full passes). A decoder that matched is kept for later sweeps of the
    same model until a weight changes (in ``lm.extra``), so only a process's first sweep pays for the checks."""
    settings = (fuse, tuple(opening), lm.device, lm.dtype)
    if fast_forward:
        cached = lm.extra.get(CHECKED_DECODER)
        if cached is not None and cached[2].lm is lm and cached[:2] == (_weights_key(lm.model), settings):
            return _FastPasses(cached[2], unit_dirs, add_vecs, keys, opening)
    if opening and not _opening_matches(lm, opening, check[:8], _last_logits(lm, check[:8])):
        opening = []
    reference = _HFPasses(lm, unit_dirs, add_vecs, keys, opening)
    decoder = SweepDecoder.for_model(lm, fuse) if fast_forward else None
    if decoder is None:
        return reference
    fast = _FastPasses(decoder, unit_dirs, add_vecs, keys, opening)
    if not _fast_matches(fast, reference, check, finite):
        return reference
    lm.extra[CHECKED_DECODER] = (_weights_key(lm.model), settings, decoder)
    return fast


def _fast_matches(fast: _FastPasses, reference: _HFPasses, seqs: Sequence[Sequence[int]], finite: torch.Tensor) -> bool:
    """Whether the sweep forward reproduces HF's forward with hooks on a few rows of every kind: ablation,
    addition, a baseline capture and a replay from it."""
    seqs = list(seqs[:4])
    usable = [c for c in range(len(fast.keys)) if finite[c]]
    if not seqs or not usable:
        return False
    cands = [usable[i * (len(usable) - 1) // 3] for i in range(4)][:len(seqs)] * 2
    cands, seqs2 = cands[:2 * len(seqs)], seqs * 2
    induce = [i >= len(seqs) for i in range(len(seqs2))]
    if not _reproduces_logits(fast.decoder.lm, "sweep forward", lambda: fast.rows(seqs2, cands, induce),
                              reference.rows(seqs2, cands, induce)):
        return False

    def replayed():
        _, capture = fast.baseline(seqs, True)
        return fast.replay(capture, list(range(len(seqs))), cands[len(seqs):])

    return _reproduces_logits(fast.decoder.lm, "sweep forward replay", replayed,
                              reference.rows(seqs, cands[len(seqs):], [True] * len(seqs)))


# --------------------------------------------------------------------------------------------------
# Scoring all candidates


def default_max_batch_rows(lm: LoadedModel) -> int:
    return 512 if lm.device.type == "cuda" else 64


def score_candidates(
    lm: LoadedModel,
    candidates: CandidateDirections,
    harmful_val: Sequence[str],
    harmless_val: Sequence[str],
    refusal_ids: Sequence[int] | None = None,
    layers: Sequence[int] | None = None,
    max_batch_rows: int | None = None,
    progress: bool = False,
    share_prefix: bool = True,
    keys: Sequence[tuple[int, int]] | None = None,
    kinds: Sequence[str] = ("bypass", "induce", "kl"),
    fuse: bool = True,
    share_opening: bool = True,
    sdpa: Sequence[str] | None = ("efficient", "math"),
    fast_forward: bool = True,
) -> list[CandidateScore]:
    """Bypass, induce and KL scores of every (position, layer) candidate (``layers``: a subset to score).

    ``max_batch_rows``: (candidate, prompt) rows per forward pass (default 512 on CUDA, 64 on CPU; halved
    on CUDA out-of-memory). ``share_prefix``: start the induce rows from the baseline's input of their
    block (checked once against the model's own logits; falls back to full passes if they differ).
    Returned in position-major order (position, then layer), like the paper's file. ``keys``: explicit
    (position, layer) candidates instead of ``layers``; ``kinds``: the scores to compute (others are NaN).
    ``fuse``: on CUDA, RMSNorm and rotary embedding run with fewer kernels where that is verified (`fusion`).
    ``share_opening``: compute the chat template's opening tokens (shared by every prompt) once per distinct
    intervention in a batch instead of once per row (checked once against full passes, as for share_prefix).
    ``sdpa``: attention kernels allowed on CUDA, in order of preference (`fusion.restricted_sdpa`); None: torch's
    pick. Default memory-efficient attention: on an H200 at gemma-2b shape torch's pick (cuDNN) builds a plan for
    every new shape, and the sweep's batches have many (HF forward path: first call 6.0-10.2 s vs 3.3-3.6 s).
    ``fast_forward``: run the passes with `fast_forward.SweepDecoder` where it supports the model
    (standard pre-norm decoders; checked once against HF's forward with hooks, which is used otherwise).
    """
    with fused_kernels(lm.model, fuse), restricted_sdpa(lm.device, sdpa):
        return _score_candidates(lm, candidates, harmful_val, harmless_val, refusal_ids, layers, max_batch_rows,
                                 progress, share_prefix, keys, kinds, share_opening, fast_forward, fuse)


@torch.no_grad()
def _score_candidates(lm: LoadedModel, candidates: CandidateDirections, harmful_val: Sequence[str],
                      harmless_val: Sequence[str], refusal_ids: Sequence[int] | None, layers: Sequence[int] | None,
                      max_batch_rows: int | None, progress: bool, share_prefix: bool,
                      keys: Sequence[tuple[int, int]] | None, kinds: Sequence[str],
                      share_opening: bool, fast_forward: bool, fuse: bool) -> list[CandidateScore]:
    """`score_candidates` inside its kernel choices."""
    want_bypass, want_induce, want_kl = ("bypass" in kinds), ("induce" in kinds), ("kl" in kinds)
    if (want_bypass and not harmful_val) or ((want_induce or want_kl) and not harmless_val):
        raise UserError(f"selection needs harmful and harmless validation instructions "
                        f"(got {len(harmful_val)} and {len(harmless_val)})")
    if candidates.d_model != lm.d_model:
        raise UserError(f"candidate directions have d_model {candidates.d_model} but {lm.model_id} has "
                        f"{lm.d_model}; extract the candidates from this model")
    if keys is not None:
        layers = sorted({layer for _, layer in keys})
    layers = list(range(candidates.n_layers)) if layers is None else list(layers)
    bad = [x for x in layers if not 0 <= x < min(candidates.n_layers, lm.n_layers)]
    if bad:
        raise UserError(f"layers {bad} are out of range for {lm.model_id} ({lm.n_layers} layers: "
                        f"0..{lm.n_layers - 1})")
    refusal_ids = list(refusal_ids) if refusal_ids is not None else default_refusal_ids(lm)
    max_batch_rows = max_batch_rows or default_max_batch_rows(lm)
    t0 = time.perf_counter()

    keys = [(p, layer) for p in candidates.positions for layer in layers] if keys is None else list(keys)
    raw = torch.stack([candidates.vectors[candidates.positions.index(p), layer] for p, layer in keys])  # [n, d]
    raw = raw.double()
    norms = raw.norm(dim=-1)
    ablatable = (norms > 0) & torch.isfinite(norms)  # a zero direction has no unit vector: NaN scores
    finite = torch.isfinite(raw).all(-1)
    unit_dirs = torch.where(ablatable.unsqueeze(-1), raw / norms.clamp_min(1e-300).unsqueeze(-1), 0)
    unit_dirs = unit_dirs.to(device=lm.device, dtype=lm.dtype)  # [n, d]
    add_vecs = raw.to(device=lm.device, dtype=lm.dtype)  # [n, d]
    if not ablatable.all():
        log.info("%d candidates have a zero or non-finite direction (e.g. layer 0, where every prompt has "
                 "the same token embedding): their bypass and KL scores are NaN", int((~ablatable).sum()))

    harmful_ids, harmless_ids = _tokenize_each(lm, harmful_val), _tokenize_each(lm, harmless_val)
    if not (want_induce or want_kl):
        harmless_ids = []  # no baseline pass needed

    opening = common_opening(harmful_ids + harmless_ids) if share_opening else []
    passes = _choose_passes(lm, unit_dirs, add_vecs, keys, opening, harmless_ids or harmful_ids, finite,
                            fast_forward, fuse)
    opening = passes.opening

    # Baseline of the harmless prompts in groups of similar length (computed once, for the KL); with
    # share_prefix, each group's block inputs are kept so the induce rows can start at their layer.
    by_length = sorted(range(len(harmless_ids)), key=lambda i: len(harmless_ids[i]))
    group_size = max(1, PREFIX_GROUP_ROWS_FACTOR * max_batch_rows // max(1, len(keys))) if share_prefix \
        else max_batch_rows
    groups = [by_length[i:i + group_size] for i in range(0, len(by_length), group_size)]
    prefixes, base_parts = [], []
    for group in groups:
        logits, prefix = passes.baseline([harmless_ids[i] for i in group], share_prefix)
        if share_prefix and not prefixes and not passes.replay_matches(prefix, logits):
            share_prefix = False
        prefixes.append(prefix if share_prefix else None)
        base_parts.append(torch.log_softmax(logits.double(), dim=-1))
    base_logp = None
    if base_parts:
        base_logp = torch.empty(len(harmless_ids), base_parts[0].shape[-1], dtype=torch.float64, device=lm.device)
        base_logp[device_tensor(by_length, lm.device)] = torch.cat(base_parts)  # [n_harmless, vocab] float64
    group_of = {i: (g, j) for g, group in enumerate(groups) for j, i in enumerate(group)}  # prompt -> (group, row)

    # One row per (candidate, kind, prompt): (prompt length, kind, candidate, prompt).
    rows, replay_rows = [], []
    for c in range(len(keys)):
        if ablatable[c] and want_bypass:
            rows += [(len(s), BYPASS, c, i) for i, s in enumerate(harmful_ids)]
        if ablatable[c] and want_kl:
            rows += [(len(s), KL, c, i) for i, s in enumerate(harmless_ids)]
        if finite[c] and want_induce:
            (replay_rows if share_prefix else rows).extend(
                (len(s), INDUCE, c, i) for i, s in enumerate(harmless_ids))
    rows.sort(key=lambda r: r[0])  # similar lengths share a batch: little padding
    # by group, then length (a batch of the sweep forward pads only to its own longest prompt), then start layer
    replay_rows.sort(key=lambda r: (group_of[r[3]][0], r[0], keys[r[2]][1]))

    def step(batch: Sequence[tuple[int, int, int, int]]) -> Sequence[torch.Tensor]:
        _, kinds, cands, prompts = zip(*batch)
        seqs = [(harmful_ids if k == BYPASS else harmless_ids)[p] for k, p in zip(kinds, prompts)]
        logits = passes.rows(seqs, cands, [k == INDUCE for k in kinds])  # [batch, vocab]
        kl_rows = [i for i, k in enumerate(kinds) if k == KL]
        metric_rows = [i for i, k in enumerate(kinds) if k != KL]
        values = _row_values(logits, metric_rows, kl_rows, [prompts[i] for i in kl_rows], base_logp, refusal_ids)
        return values.unbind()  # one 0-d device tensor per row: no host sync per batch

    def replay_step(batch: Sequence[tuple[int, int, int, int]]) -> list[torch.Tensor]:
        out = []
        for g in sorted({group_of[r[3]][0] for r in batch}):  # batch is sorted by group
            part = [r for r in batch if group_of[r[3]][0] == g]
            logits = passes.replay(prefixes[g], [group_of[r[3]][1] for r in part], [r[2] for r in part])
            out += refusal_metric(logits, refusal_ids).unbind()
        return out

    values = run_batched(step, rows, max_batch_rows, "selection", progress)
    values += run_batched(replay_step, replay_rows, max_batch_rows, "selection (induce)", progress)
    values = torch.stack(values).cpu() if values else torch.zeros(0, dtype=torch.float64)  # [n_rows]
    rows += replay_rows

    slot = torch.tensor([c * 3 + k for _, k, c, _ in rows])  # candidate-major (candidate, kind) cell
    sums = torch.zeros(len(keys) * 3, dtype=torch.float64).index_add_(0, slot, values)
    counts = torch.bincount(slot, minlength=len(keys) * 3).double()
    means = (sums / counts).view(len(keys), 3)  # 0/0 = NaN for candidates that were not scored
    scores = [CandidateScore(p, layer, float(means[c, BYPASS]), float(means[c, INDUCE]), float(means[c, KL]))
              for c, (p, layer) in enumerate(keys)]
    notes = [passes.name] + ([f"a {len(opening)}-token chat-template opening shared"] if opening else []) + \
        (["induce rows from shared prefixes"] if share_prefix else [])
    log.info("scored %d candidates on %d harmful + %d harmless prompts (%d rows%s) in %.2fs", len(keys),
             len(harmful_val), len(harmless_val), len(rows), "".join(", " + n for n in notes),
             time.perf_counter() - t0)
    return scores


def _row_values(logits, metric_rows, kl_rows, kl_prompts, base_logp, refusal_ids) -> torch.Tensor:
    """Refusal metric of ``metric_rows``, KL(baseline ‖ row) of ``kl_rows``: [batch] float64, on device."""
    out = torch.empty(logits.shape[0], dtype=torch.float64, device=logits.device)
    for s in range(0, len(metric_rows), REDUCE_ROWS):
        idx = device_tensor(metric_rows[s:s + REDUCE_ROWS], logits.device)
        out[idx] = refusal_metric(logits[idx], refusal_ids)
    for s in range(0, len(kl_rows), REDUCE_ROWS):
        idx = device_tensor(kl_rows[s:s + REDUCE_ROWS], logits.device)
        base = base_logp[device_tensor(kl_prompts[s:s + REDUCE_ROWS], logits.device)]  # [rows, vocab]
        logp = torch.log_softmax(logits[idx].double(), dim=-1)
        out[idx] = (base.exp() * (base - logp)).sum(-1)
    return out


# --------------------------------------------------------------------------------------------------
# Filtering and ranking


def discard_reasons(score: CandidateScore, n_layers: int, thresholds: SelectionThresholds) -> tuple[str, ...]:
    """Every filter that removes ``score`` (empty tuple = it survives)."""
    if score.has_nan():
        return (NAN,)
    reasons = []
    if score.layer >= thresholds.max_layer(n_layers):
        reasons.append(LATE_LAYER)
    if score.kl > thresholds.kl_threshold:
        reasons.append(HIGH_KL)
    if score.induce < thresholds.induce_threshold:
        reasons.append(LOW_INDUCE)
    return tuple(reasons)


def filter_and_rank(
    scores: Sequence[CandidateScore],
    n_layers: int,
    thresholds: SelectionThresholds = SelectionThresholds(),
) -> SelectionResult:
    """Discard candidates by the filters and choose the survivor with the lowest bypass score."""
    survivors, discarded = [], []
    for s in scores:
        reasons = discard_reasons(s, n_layers, thresholds)
        if reasons:
            discarded.append((s, reasons))
        else:
            survivors.append(s)
    if not survivors:
        raise UserError(_nothing_survives_message(scores, n_layers, thresholds))
    survivors.sort(key=lambda s: s.bypass)  # stable: ties keep the input order
    best = survivors[0]
    log.info("selected position %d, layer %d (bypass %.3f, induce %.3f, KL %.4f); %d of %d candidates passed "
             "the filters", best.position, best.layer, best.bypass, best.induce, best.kl, len(survivors),
             len(scores))
    return SelectionResult(best.position, best.layer, tuple(survivors), tuple(discarded), thresholds, n_layers)


def select_lazy(
    lm: LoadedModel,
    candidates: CandidateDirections,
    harmful_val: Sequence[str],
    harmless_val: Sequence[str],
    thresholds: SelectionThresholds = SelectionThresholds(),
    layers: Sequence[int] | None = None,
    group: int = 4,
    refusal_ids: Sequence[int] | None = None,
    max_batch_rows: int | None = None,
    progress: bool = False,
) -> tuple[SelectionResult, list[CandidateScore]]:
    """The paper's choice at a fraction of the cost: same answer as `score_candidates` + `filter_and_rank`.

    The choice is the lowest-bypass candidate that passes the filters. So: skip layers the layer filter
    removes anyway, compute only the bypass score of the rest, then compute induce and KL in ascending
    bypass order, ``group`` candidates at a time, and stop at the first candidate that passes. Every
    candidate with a lower bypass score was evaluated and failed, so the choice equals the full sweep's.
    Unevaluated candidates keep NaN induce/KL (the survivors list holds evaluated candidates only).
    """
    n_layers = candidates.n_layers
    max_layer = thresholds.max_layer(n_layers)
    layers = [x for x in (range(n_layers) if layers is None else layers) if x < max_layer]
    keys = [(p, x) for p in candidates.positions for x in layers]
    bypass = score_candidates(lm, candidates, harmful_val, harmless_val, refusal_ids, max_batch_rows=max_batch_rows,
                              progress=progress, keys=keys, kinds=("bypass",))
    scores = {(s.position, s.layer): s for s in bypass}
    order = sorted((s for s in bypass if math.isfinite(s.bypass)), key=lambda s: s.bypass)
    chosen = None
    for start in range(0, len(order), group):
        chunk = [(s.position, s.layer) for s in order[start:start + group]]
        rest = score_candidates(lm, candidates, harmful_val, harmless_val, refusal_ids,
                                max_batch_rows=max_batch_rows, keys=chunk, kinds=("induce", "kl"))
        for r in rest:
            scores[(r.position, r.layer)] = replace(scores[(r.position, r.layer)], induce=r.induce, kl=r.kl)
        for key in chunk:
            if not discard_reasons(scores[key], n_layers, thresholds):
                chosen = key
                break
        if chosen:
            break
    evaluated = [s for s in scores.values() if math.isfinite(s.induce) or math.isfinite(s.kl)]
    if chosen is None:
        raise UserError(_nothing_survives_message(evaluated or list(scores.values()), n_layers, thresholds))
    result = filter_and_rank(evaluated, n_layers, thresholds)
    assert (result.position, result.layer) == chosen
    log.info("lazy selection: bypass for %d candidates, induce/KL for %d", len(keys), len(evaluated))
    return result, [scores[k] for k in keys]


def describe_reason(code: str, score: CandidateScore, n_layers: int, thresholds: SelectionThresholds) -> str:
    if code == NAN:
        return "a score is NaN (e.g. a zero direction)"
    if code == LATE_LAYER:
        return (f"layer {score.layer} >= {thresholds.max_layer(n_layers)} "
                f"(prune_layer_fraction={thresholds.prune_layer_fraction})")
    if code == HIGH_KL:
        return f"KL {score.kl:.4g} > kl_threshold={thresholds.kl_threshold}"
    if code == LOW_INDUCE:
        return f"induce {score.induce:.4g} < induce_threshold={thresholds.induce_threshold}"
    raise ValueError(code)


def _relaxation(score: CandidateScore, reasons: tuple[str, ...], n_layers: int) -> list[str]:
    """Threshold settings under which ``score`` would survive."""
    out = []
    if LATE_LAYER in reasons:
        out.append(f"prune_layer_fraction={math.floor(1000 * (1.0 - (score.layer + 1) / n_layers)) / 1000:g}")
    if HIGH_KL in reasons:
        out.append(f"kl_threshold={_round_up(score.kl):g}")
    if LOW_INDUCE in reasons:
        out.append(f"induce_threshold={-_round_up(-score.induce):g}")
    return out


def _relaxation_cost(s: CandidateScore, n_layers: int, t: SelectionThresholds) -> float:
    """How far the thresholds must move to keep ``s``, each filter on its own scale."""
    cost = 0.0
    if s.kl > t.kl_threshold:
        cost += s.kl / t.kl_threshold if t.kl_threshold > 0 else 1.0 + s.kl
    if s.induce < t.induce_threshold:
        cost += (t.induce_threshold - s.induce) / max(1.0, abs(t.induce_threshold))
    if s.layer >= t.max_layer(n_layers):
        cost += 1.0 + s.layer - t.max_layer(n_layers)
    return cost


def _round_up(x: float) -> float:
    """A number with 2 significant digits that is >= x."""
    if x == 0:
        return 0.0
    scale = 10.0 ** (math.floor(math.log10(abs(x))) - 1)
    return math.ceil(x / scale - 1e-9) * scale


def _nothing_survives_message(scores: Sequence[CandidateScore], n_layers: int,
                              thresholds: SelectionThresholds) -> str:
    t = thresholds
    head = (f"no candidate direction passed the selection filters ({len(scores)} candidates; "
            f"kl_threshold={t.kl_threshold}, induce_threshold={t.induce_threshold}, "
            f"prune_layer_fraction={t.prune_layer_fraction} -> layers >= {t.max_layer(n_layers)} pruned).")
    valid = sorted((s for s in scores if not s.has_nan()), key=lambda s: s.bypass)
    if not valid:
        return (head + " Every candidate has a NaN score: check the candidate directions (all zero?) and use "
                "--dtype float32 if the model overflows in half precision.")
    lines = [head, "Best candidates by bypass score (lower = ablation removes refusal better):"]
    for s in valid[:5]:
        why = "; ".join(describe_reason(c, s, n_layers, thresholds) for c in discard_reasons(s, n_layers, thresholds))
        lines.append(f"  position {s.position}, layer {s.layer}: bypass {s.bypass:.3f}, induce {s.induce:.3f}, "
                     f"KL {s.kl:.4f} - removed by: {why}")
    # Suggest the smallest relaxations (relative to the thresholds) among the 10 best by bypass score.
    ranked = sorted(valid[:10], key=lambda s: _relaxation_cost(s, n_layers, thresholds))
    suggestions = []
    for s in ranked:
        relax = _relaxation(s, discard_reasons(s, n_layers, thresholds), n_layers)
        if len(suggestions) < 3 and relax and relax not in [r for r, _ in suggestions]:
            suggestions.append((relax, s))
    lines.append("Relax the thresholds (config keys) to keep one of them, e.g. " + "; or ".join(
        f"{', '.join(r)} (keeps position {s.position}, layer {s.layer})" for r, s in suggestions) +
        ". Or choose the direction by hand with --select fixed --layer L --position P.")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# JSON (ours and the paper's direction_evaluations.json)


def score_to_json(s: CandidateScore) -> dict:
    def num(x: float) -> float | None:
        return None if math.isnan(x) else x

    return {"position": s.position, "layer": s.layer,
            "bypass_score": num(s.bypass), "induce_score": num(s.induce), "kl_score": num(s.kl),
            # the paper's keys, for tools that read direction_evaluations.json
            "refusal_score": num(s.bypass), "steering_score": num(s.induce), "kl_div_score": num(s.kl)}


def scores_to_json(scores: Sequence[CandidateScore]) -> list[dict]:
    return [score_to_json(s) for s in scores]


_KEYS = {"bypass": ("bypass_score", "refusal_score"), "induce": ("induce_score", "steering_score"),
         "kl": ("kl_score", "kl_div_score")}


def scores_from_json(rows: list, source: str = "scores") -> list[CandidateScore]:
    """Rows in our format or the paper's (``refusal_score``, ``steering_score``, ``kl_div_score``)."""
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or "position" not in row or "layer" not in row:
            raise UserError(f"{source}: entry {i} is not an object with 'position' and 'layer' ({str(row)[:80]})")
        values = {}
        for name, keys in _KEYS.items():
            key = next((k for k in keys if k in row), None)
            if key is None:
                raise UserError(f"{source}: entry {i} (position {row['position']}, layer {row['layer']}) has none "
                                f"of the keys {' / '.join(keys)}; expected our selection scores or the paper's "
                                "direction_evaluations.json")
            values[name] = float("nan") if row[key] is None else float(row[key])
        out.append(CandidateScore(int(row["position"]), int(row["layer"]), **values))
    return out


def load_scores(path: str | Path) -> list[CandidateScore]:
    """Read candidate scores: a JSON list (ours or the paper's), or our selection.json (key ``scores``)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"scores file {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"scores file {path} is not valid JSON ({exc})") from exc
    if isinstance(data, dict) and isinstance(data.get("scores"), list):
        data = data["scores"]
    if not isinstance(data, list) or not data:
        raise UserError(f"scores file {path} holds no list of candidate scores (expected a JSON list like the "
                        "paper's direction_evaluations.json, or a selection.json)")
    return scores_from_json(data, str(path))


def result_to_json(result: SelectionResult, scores: Sequence[CandidateScore] | None = None) -> dict:
    """The choice, thresholds, ordered survivors, and every scored candidate with its discard reasons."""
    reasons = {(s.position, s.layer): r for s, r in result.discarded}
    all_scores = list(scores) if scores is not None else list(result.survivors) + [s for s, _ in result.discarded]
    return {
        "chosen": score_to_json(result.chosen),
        "thresholds": {"kl_threshold": result.thresholds.kl_threshold,
                       "induce_threshold": result.thresholds.induce_threshold,
                       "prune_layer_fraction": result.thresholds.prune_layer_fraction,
                       "first_pruned_layer": result.max_layer},
        "n_layers": result.n_layers,
        "survivors": [{"position": s.position, "layer": s.layer} for s in result.survivors],
        "scores": [{**score_to_json(s), "discarded": list(reasons.get((s.position, s.layer), ()))}
                   for s in all_scores],
    }


def select_from_scores_file(
    path: str | Path, n_layers: int | None = None, thresholds: SelectionThresholds = SelectionThresholds()
) -> SelectionResult:
    """Re-run the filters on saved scores (no model needed); ``n_layers`` defaults to max layer + 1."""
    scores = load_scores(path)
    if n_layers is None:
        n_layers = max(s.layer for s in scores) + 1
        log.info("n_layers not given: assuming %d (largest scored layer + 1)", n_layers)
    return filter_and_rank(scores, n_layers, thresholds)


# --------------------------------------------------------------------------------------------------
# Figure


def plot_selection_heatmaps(
    scores: Sequence[CandidateScore],
    n_layers: int,
    positions: Sequence[int],
    path_png: str | Path,
    chosen: tuple[int, int] | None = None,
    thresholds: SelectionThresholds = SelectionThresholds(),
) -> Path:
    """Three position × layer heatmaps (bypass, induce, KL); ``chosen`` = (position, layer) is starred."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib import colors

    positions = list(positions)
    grids = {name: torch.full((len(positions), n_layers), float("nan"), dtype=torch.float64)
             for name in ("bypass", "induce", "kl")}
    for s in scores:
        if s.position in positions and 0 <= s.layer < n_layers:
            for name in grids:
                grids[name][positions.index(s.position), s.layer] = getattr(s, name)
    panels = [
        ("bypass", "bypass score: refusal metric on harmful, direction ablated (lower = better)", "viridis", None),
        ("induce", f"induce score: refusal metric on harmless, direction added (kept if >= "
                   f"{thresholds.induce_threshold})", "viridis", None),
        ("kl", f"KL(baseline || ablated) on harmless, last position (kept if <= {thresholds.kl_threshold})",
         "magma", "symlog"),
    ]
    fig, axes = plt.subplots(3, 1, figsize=(max(6.0, 0.45 * n_layers + 2), 3 * (0.9 + 0.3 * len(positions))),
                             constrained_layout=True)
    first_pruned = thresholds.max_layer(n_layers)
    for ax, (name, title, cmap, scale) in zip(axes, panels):
        grid = grids[name].numpy()
        norm = None
        if scale == "symlog":
            finite = grid[np.isfinite(grid)]
            vmax = float(finite.max()) if finite.size else 1.0
            norm = colors.SymLogNorm(linthresh=1e-2, vmin=0.0, vmax=max(vmax, 1e-2))
        im = ax.imshow(grid, aspect="auto", cmap=cmap, norm=norm, interpolation="nearest")
        fig.colorbar(im, ax=ax, fraction=0.03, pad=0.01)
        ax.set_title(title, fontsize=9)
        ax.set_yticks(range(len(positions)), [str(p) for p in positions])
        ax.set_xticks(range(n_layers), [str(i) for i in range(n_layers)], fontsize=7)
        ax.set_ylabel("position")
        if first_pruned < n_layers:
            ax.axvline(first_pruned - 0.5, color="white", linestyle="--", linewidth=1)
        if name == "bypass":
            kept = [s for s in scores if s.position in positions and not discard_reasons(s, n_layers, thresholds)]
            ax.plot([s.layer for s in kept], [positions.index(s.position) for s in kept], linestyle="none",
                    marker="o", markersize=3, color="white")
        if chosen is not None and chosen[0] in positions:
            ax.plot(chosen[1], positions.index(chosen[0]), marker="*", color="red", markersize=14,
                    markeredgecolor="white")
    axes[-1].set_xlabel("layer (dashed line: first pruned layer; dots: passed the filters; star: chosen)")
    path_png = Path(path_png)
    path_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path_png, dpi=120)
    plt.close(fig)
    return path_png


__all__ = ["CandidateScore", "SelectionThresholds", "SelectionResult", "refusal_token_ids", "default_refusal_ids",
           "refusal_metric", "refusal_metrics", "filter_validation", "per_row_interventions",
           "score_candidates", "filter_and_rank", "discard_reasons", "scores_to_json", "scores_from_json",
           "load_scores", "result_to_json", "select_from_scores_file", "plot_selection_heatmaps"]
