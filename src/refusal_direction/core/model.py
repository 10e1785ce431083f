"""Model stage: load any HF causal LM, format chat prompts, and find the residual-stream sites.

Everything model-specific is *derived* here, never hard-coded per family:

- the chat format (text before and after the instruction) comes from the tokenizer's chat template,
  rendered once around a sentinel; gemma-2b-it's format is pinned to the paper's exact string;
- the post-instruction tokens are the tokens of the text after the instruction
  (gemma-2b-it: ``<end_of_turn>``, ``\\n``, ``<start_of_turn>``, ``model``, ``\\n``);
- decoder blocks, attention and MLP modules are found by inspecting the module tree.

`LoadedModel` bundles the HF model, tokenizer and these derived facts; later stages take it as input.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError
from .checks import check_tokenizer, has_control_string, hub_error, missing_tokenizer_files, pad_left

__all__ = ["ChatFormat", "BlockSites", "LoadedModel", "load_model", "load_tokenizer", "wrap_model", "hub_error",
           "derive_chat_format", "resolve_dtype", "resolve_device", "tokenize_prompts", "find_blocks"]

log = logging.getLogger(__name__)

DEFAULT_MODEL = "google/gemma-2b-it"
_SENTINEL = "\x00INSTRUCTION\x00"

# The paper's exact Gemma-1 prompt (no system turn). Used for model_type "gemma".
GEMMA_PREFIX = "<bos><start_of_turn>user\n"
GEMMA_SUFFIX = "<end_of_turn>\n<start_of_turn>model\n"


@dataclass(frozen=True)
class ChatFormat:
    """A single-turn chat prompt: ``prefix + instruction + suffix`` (suffix = post-instruction text)."""

    prefix: str
    suffix: str
    source: str  # where it came from, for the log and the run config

    def render(self, instruction: str) -> str:
        return self.prefix + instruction + self.suffix


@dataclass(frozen=True)
class BlockSites:
    """Modules of one decoder block whose outputs are added into the residual stream."""

    block: nn.Module
    attn_out: nn.Module  # output is (or starts with) the attention contribution to the residual
    mlp_out: nn.Module  # output is the MLP contribution to the residual


@dataclass
class LoadedModel:
    """An HF causal LM with its tokenizer and the facts later stages need."""

    model: nn.Module
    tokenizer: object
    model_id: str
    chat: ChatFormat
    post_instruction_ids: list[int]
    blocks: list[BlockSites]
    final_norm: nn.Module | None
    revision: str | None = None
    dtype_reason: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @property
    def d_model(self) -> int:
        return int(self.model.config.get_text_config().hidden_size)

    @property
    def device(self) -> torch.device:
        """Where inputs go: the token embedding's (execution) device; with a device map, not every block's."""
        return input_device(self.model)

    @property
    def placement(self) -> str:
        """Why the model does not sit on one device ("" when it does: the fast paths' precondition)."""
        return placement_note(self.model)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def n_post_instruction(self) -> int:
        return len(self.post_instruction_ids)

    def post_instruction_tokens(self) -> list[str]:
        """The post-instruction tokens as text, one string per token."""
        return [self.tokenizer.decode([i]) for i in self.post_instruction_ids]

    def format(self, instruction: str) -> str:
        return self.chat.render(instruction)

    def tokenize(self, instructions: list[str]) -> dict[str, torch.Tensor]:
        """Chat-format and tokenize a batch, left-padded: ``input_ids``, ``attention_mask`` [batch, seq].

        Special-token strings inside an instruction (``<end_of_turn>``) are tokenized as text (see `encode`)."""
        if not any(has_control_string(self.tokenizer, x) for x in instructions):
            return tokenize_prompts(self.tokenizer, [self.format(x) for x in instructions], self.device)
        return pad_left(self.tokenizer, [self.encode(x) for x in instructions], self.device)

    def encode(self, instruction: str) -> list[int]:
        """The token ids of one chat prompt. The template's own special tokens are control tokens; the same
        strings inside the user's instruction are split as plain text (no template injection). Instructions
        without such strings are tokenized as one string, exactly as before (the paper's token ids)."""
        if not has_control_string(self.tokenizer, instruction):
            return list(self.tokenizer(self.format(instruction), add_special_tokens=False)["input_ids"])
        tok = self.tokenizer
        return (list(tok(self.chat.prefix, add_special_tokens=False)["input_ids"])
                + list(tok(instruction, add_special_tokens=False, split_special_tokens=True)["input_ids"])
                + list(self.post_instruction_ids))

    def eos_ids(self) -> list[int]:
        """End-of-sequence ids: the tokenizer's eos plus the model's generation-config eos (what HF
        ``generate`` stops at by default; Qwen's GGUF: ``<|endoftext|>`` and ``<|im_end|>``)."""
        ids = []
        if self.tokenizer.eos_token_id is not None:
            ids.append(int(self.tokenizer.eos_token_id))
        gen = getattr(self.model, "generation_config", None)
        extra = getattr(gen, "eos_token_id", None) if gen is not None else None
        for i in extra if isinstance(extra, (list, tuple)) else [extra]:
            if i is not None and int(i) not in ids:
                ids.append(int(i))
        return ids

    def end_of_turn_ids(self) -> list[int]:
        """Token ids that end an assistant turn: eos ids plus the template's end-of-turn token if any."""
        ids = self.eos_ids()
        first = self.post_instruction_ids[0]
        if first in set(self.tokenizer.all_special_ids) and first not in ids:
            ids.append(first)
        return ids


def tokenize_prompts(tokenizer, prompts: list[str], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Tokenize already-formatted prompts (special tokens are in the text), left-padded."""
    if tokenizer.padding_side != "left":
        tokenizer.padding_side = "left"
    enc = tokenizer(prompts, padding=True, add_special_tokens=False, return_tensors="pt")
    return {"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device)}


# --------------------------------------------------------------------------------------------------
# Loading


def resolve_dtype(dtype: str, device: str) -> tuple[torch.dtype, str]:
    """``auto`` = bf16 on CUDA, fp32 on CPU; returns the dtype and the reason, for the log."""
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype != "auto":
        if dtype not in names:
            raise UserError(f"dtype={dtype!r} is not supported; use one of auto, {', '.join(names)}")
        return names[dtype], f"{dtype}: set by the user"
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(device))
        return torch.bfloat16, f"bfloat16: auto-detected, CUDA device {name}"
    return torch.float32, f"float32: auto-detected, device {device}"


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device={device!r} was requested but CUDA is not available here; use --device cpu")
    return device


def load_model(
    model: str = DEFAULT_MODEL,
    device: str = "auto",
    dtype: str = "auto",
    revision: str | None = None,
    chat_template: str | None = None,
    device_map: str | dict | None = None,
    max_memory: str | dict | None = None,
    offload_folder: str | None = None,
) -> LoadedModel:
    """Load a Hub id, a local model directory, or a ``.gguf`` file, and derive its chat facts.

    ``device_map`` (auto | balanced | balanced_low_0 | sequential | a FILE.json | a dict) and ``max_memory``
    ("0=60GiB,cpu=200GiB" or a dict) dispatch the model over GPUs, CPU and disk with accelerate
    (`core.placement`; docs/SCALING.md); ``device`` is then ignored except for the dtype choice.
    """
    from .gguf_cache import load_causal_lm

    device = resolve_device(device)
    dispatch = dispatch_kwargs(device_map, max_memory, offload_folder)
    torch_dtype, reason = resolve_dtype(dtype, "cuda" if dispatch and torch.cuda.is_available() else device)
    log.info("loading %s on %s (%s)", model, describe_dispatch(dispatch) or device, reason)
    source, kwargs = model_source(model, revision)
    token = os.environ.get("HF_TOKEN")
    try:
        tokenizer = load_tokenizer(source, **kwargs)
        hf_model = load_causal_lm(source, torch_dtype, token, kwargs, dispatch)  # a GGUF: converted once, cached
    except Exception as exc:  # translate hub/gating/offline failures into actionable messages
        raise hub_error(model, exc) from exc
    if not dispatch:
        hf_model.to(device)
    hf_model.eval()
    hf_model.requires_grad_(False)
    if dispatch:
        log.info("device map: %s", placement_note(hf_model) or f"one device ({input_device(hf_model)})")
    return wrap_model(hf_model, tokenizer, model_id=model, revision=revision,
                      chat_template=chat_template, dtype_reason=reason)


def model_source(model: str, revision: str | None = None) -> tuple[str, dict]:
    """(directory or Hub id, from_pretrained kwargs) of a model argument; a ``.gguf`` file is its folder plus
    ``gguf_file``. Preflight and `load_model` both use it, so their cache keys agree."""
    if model.endswith(".gguf"):
        path = Path(model)
        if not path.is_file():
            raise UserError(f"GGUF file {model!r} does not exist; for the demo model run "
                            "`refusal-direction fetch-model qwen2.5-coder-0.5b-instruct` first")
        return str(path.parent), {"gguf_file": path.name}
    return model, ({"revision": revision} if revision else {})


def load_tokenizer(source: str, **kwargs):
    """AutoTokenizer, cached per process and, for a GGUF file, converted once and kept on disk (`gguf_cache`)."""
    from .gguf_cache import load_tokenizer_cached

    if Path(source).is_dir() and "gguf_file" not in kwargs:
        missing_tokenizer_files(Path(source))
    return load_tokenizer_cached(source, **kwargs)


def load_config(source: str, **kwargs):
    """AutoConfig, cached per process and, for a GGUF file, on disk (`gguf_cache`)."""
    from .gguf_cache import load_config_cached

    return load_config_cached(source, **kwargs)


def dispatch_kwargs(device_map: str | dict | None, max_memory: str | dict | None = None,
                    offload_folder: str | None = None) -> dict:
    """from_pretrained kwargs for accelerate dispatch ({} when ``device_map`` is None)."""
    from .placement import parse_device_map, parse_max_memory

    if device_map is None:
        if max_memory is not None:
            raise UserError("--max-memory needs --device-map (e.g. --device-map auto --max-memory 0=60GiB,cpu=200GiB)")
        return {}
    out: dict = {"device_map": parse_device_map(device_map)}
    if max_memory is not None:
        out["max_memory"] = parse_max_memory(max_memory)
    if offload_folder is None:
        offload_folder = tempfile.mkdtemp(prefix="refusal-direction-offload-")
    out["offload_folder"] = offload_folder
    return out


def describe_dispatch(dispatch: dict) -> str:
    if not dispatch:
        return ""
    dm = dispatch["device_map"]
    text = f"device_map={dm if isinstance(dm, str) else 'FILE'}"
    return text + (f", max_memory={dispatch['max_memory']}" if "max_memory" in dispatch else "")


def input_device(model: nn.Module) -> torch.device:
    """The device inputs must be on: the token embedding's execution device (accelerate's hook), else its weight's."""
    from .placement import module_device

    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return module_device(emb if emb is not None else model)


def placement_note(model: nn.Module) -> str:
    """Why ``model`` is not on one device ("" if it is): from accelerate's ``hf_device_map``."""
    from .placement import placement_note as note

    return note(model)


def wrap_model(
    hf_model: nn.Module,
    tokenizer,
    model_id: str,
    revision: str | None = None,
    chat_template: str | None = None,
    dtype_reason: str = "",
) -> LoadedModel:
    """Derive chat format, post-instruction tokens and residual sites for an already-loaded model."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    chat = derive_chat_format(tokenizer, getattr(hf_model.config, "model_type", ""), chat_template)
    embedding = hf_model.get_input_embeddings() if hasattr(hf_model, "get_input_embeddings") else None
    vocab = getattr(embedding, "num_embeddings", None) or getattr(hf_model.config.get_text_config(), "vocab_size",
                                                                  None)
    if vocab:
        check_tokenizer(tokenizer, int(vocab), model_id)
    post_ids = tokenizer(chat.suffix, add_special_tokens=False)["input_ids"]
    if not post_ids:
        raise UserError(f"the chat template of {model_id} puts no tokens after the instruction; "
                        "pass --chat-template with a template that ends the user turn")
    check_suffix_tokenization(tokenizer, chat, post_ids)
    blocks, final_norm = find_blocks(hf_model)
    lm = LoadedModel(model=hf_model, tokenizer=tokenizer, model_id=model_id, chat=chat,
                     post_instruction_ids=list(post_ids), blocks=blocks, final_norm=final_norm,
                     revision=revision, dtype_reason=dtype_reason)
    log.info("chat format from %s; post-instruction tokens: %s", chat.source, lm.post_instruction_tokens())
    log.info("%d decoder blocks, d_model %d", lm.n_layers, lm.d_model)
    return lm


def derive_chat_format(tokenizer, model_type: str = "", chat_template: str | None = None) -> ChatFormat:
    """Render the template around a sentinel instruction and split it into prefix / suffix."""
    if chat_template is None and model_type == "gemma":
        return ChatFormat(GEMMA_PREFIX, GEMMA_SUFFIX, "gemma-1 format of the paper (no system turn)")
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if not template:
        raise UserError(
            "the tokenizer has no chat template, so the prompt format cannot be derived; pass "
            "--chat-template FILE.jinja (a Jinja chat template) or use an instruct/chat model")
    import jinja2

    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": _SENTINEL}], chat_template=template,
                                             tokenize=False, add_generation_prompt=True)
    except (jinja2.TemplateError, TypeError, ValueError) as exc:
        where = "the --chat-template file" if chat_template else "the tokenizer's chat template"
        raise UserError(f"{where} cannot render a single user message ({type(exc).__name__}: {exc}); fix it or "
                        "pass --chat-template with a standard single-turn template") from exc
    if text.count(_SENTINEL) != 1:
        raise UserError("the chat template does not place the user message exactly once; "
                        "pass --chat-template with a standard single-turn template")
    prefix, suffix = text.split(_SENTINEL)
    bos = tokenizer.bos_token
    if bos and not prefix.startswith(bos) and adds_bos(tokenizer):
        prefix = bos + prefix
    return ChatFormat(prefix, suffix, "chat template override" if chat_template else "tokenizer chat template")


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer prepends bos by default (then the prompt must carry it explicitly)."""
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def check_suffix_tokenization(tokenizer, chat: ChatFormat, post_ids: list[int]) -> None:
    """The suffix must tokenize the same on its own and at the end of a full prompt."""
    for example in ("How do I bake bread?", "Write a poem."):
        ids = tokenizer(chat.render(example), add_special_tokens=False)["input_ids"]
        if ids[-len(post_ids):] != post_ids:
            raise UserError(
                "the post-instruction text tokenizes differently inside a prompt than alone "
                f"({ids[-len(post_ids):]} vs {post_ids}); positions would be misaligned. "
                "Pass --chat-template with a template whose turn end is a special token")


def find_blocks(hf_model: nn.Module) -> tuple[list[BlockSites], nn.Module | None]:
    """Find the decoder blocks and, in each, the modules that write into the residual stream."""
    n = int(hf_model.config.get_text_config().num_hidden_layers)
    layers_name, layers = None, None
    for name, module in hf_model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            layers_name, layers = name, module
            break
    if layers is None:
        raise UserError(f"could not find the {n} decoder blocks of {type(hf_model).__name__} "
                        "(no nn.ModuleList of that length); this architecture is not supported")
    sites = [block_sites(block, i) for i, block in enumerate(layers)]
    parent_name = layers_name.rsplit(".", 1)[0] if "." in layers_name else ""
    parent = hf_model.get_submodule(parent_name) if parent_name else hf_model
    final_norm = next((m for k, m in parent.named_children() if "norm" in k.lower()), None)
    return sites, final_norm


def block_sites(block: nn.Module, index: int) -> BlockSites:
    children = dict(block.named_children())
    # Sandwich-norm blocks (Gemma-2/3 style) normalise each sub-layer's output before adding it to
    # the residual; the norm's output is what is written, so that is the exact site to hook.
    if "pre_feedforward_layernorm" in children and "post_feedforward_layernorm" in children:
        return BlockSites(block, children["post_attention_layernorm"], children["post_feedforward_layernorm"])
    attn = next((m for k, m in children.items() if "attn" in k.lower() or "attention" in k.lower()), None)
    mlp = next((m for k, m in children.items() if k.lower() in ("mlp", "feed_forward", "ffn", "block_sparse_moe")),
               None)
    if attn is None or mlp is None:
        raise UserError(f"decoder block {index} ({type(block).__name__}) has no recognisable attention/MLP "
                        f"children (found {sorted(children)}); this architecture is not supported")
    return BlockSites(block, attn, mlp)
