"""Load-time checks: the tokenizer against the model, load errors by type, special-token strings in user text.

- `check_tokenizer`: ids fit the embedding, the vocabulary is real (not transformers' 5-token placeholder
  built from a directory without tokenizer files), there is an eos token.
- `hub_error`: a loading exception as a `UserError`, classified by exception type and HTTP status.
- `control_strings` / `has_control_string`: the strings the tokenizer turns into control tokens, so that
  user text containing them (``<end_of_turn>``) can be tokenized as plain text.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import UserError


def control_strings(tokenizer) -> tuple[str, ...]:
    """The strings the tokenizer turns into special (control) tokens: ``<end_of_turn>``, ``<|im_end|>``..."""
    found = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for t in getattr(tokenizer, "added_tokens_decoder", {}).values():
        if getattr(t, "special", False):
            found.add(str(t.content))
    return tuple(sorted(x for x in found if x))


def has_control_string(tokenizer, text: str) -> bool:
    return any(s in text for s in control_strings(tokenizer))


def pad_left(tokenizer, ids: list[list[int]], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Left-pad token id lists into ``input_ids`` and ``attention_mask`` [batch, max_len]."""
    width = max(len(x) for x in ids)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], dtype=torch.long)
    return {"input_ids": input_ids.to(device), "attention_mask": mask.to(device)}


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json", "spiece.model")


def missing_tokenizer_files(path: Path) -> None:
    """Refuse a model directory without tokenizer files (transformers would build a 5-token placeholder)."""
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise UserError(f"model directory {path} has no tokenizer files (none of {', '.join(TOKENIZER_FILES)}); "
                        "copy the model's tokenizer files into it (tokenizer.save_pretrained(DIR))")


def check_tokenizer(tokenizer, vocab_size: int, model_id: str) -> None:
    """The tokenizer must fit the model: ids < the embedding size, a real vocabulary, an eos token."""
    n = len(tokenizer)
    problems = []
    if n > vocab_size:
        problems.append(f"the tokenizer has {n} tokens but the model's embedding has only {vocab_size} rows")
    elif n < vocab_size / 2:
        problems.append(f"the tokenizer has only {n} tokens for a model with a {vocab_size}-token vocabulary "
                        "(a placeholder tokenizer?)")
    if tokenizer.eos_token_id is None:
        problems.append("the tokenizer has no eos token")
    if problems:
        raise UserError(f"tokenizer of {model_id} does not match the model: {'; '.join(problems)}; use the "
                        "model's own tokenizer files")


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _http_status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    return status if isinstance(status, int) else None


def hub_error(model: str, exc: Exception) -> UserError:
    """Turn a loading exception into a UserError that says what to do, by the exception's type and HTTP
    status (never by numbers in its text: a size-mismatch message with "24013" in it is not a 401)."""
    from huggingface_hub import errors as hf

    if isinstance(exc, UserError):
        return exc
    text = f"{type(exc).__name__}: {exc}"
    chain = list(_chain(exc))
    gated = any(isinstance(e, hf.GatedRepoError) or _http_status(e) in (401, 403) for e in chain)
    # transformers re-raises a GatedRepoError as OSError("You are trying to access a gated repo...")
    gated = gated or (type(exc) is OSError and "access a gated repo" in str(exc))
    missing = any(isinstance(e, (hf.RepositoryNotFoundError, hf.LocalEntryNotFoundError, hf.OfflineModeIsEnabled,
                                 hf.HFValidationError, hf.RevisionNotFoundError, hf.EntryNotFoundError))
                  or _http_status(e) == 404 for e in chain)
    missing = missing or (type(exc) is OSError and any(s in str(exc) for s in (
        "is not a local folder and is not a valid model identifier", "does not appear to have a file named",
        "We couldn't connect to", "Can't load the configuration of", "Repo id must use alphanumeric")))
    if gated:
        return UserError(
            f"{model} is a gated model and this machine has no access to it. Accept the license on "
            f"https://huggingface.co/{model}, create a token, and set HF_TOKEN=<token> (or run "
            "`huggingface-cli login`); or pass a local model directory.\n(underlying error: "
            f"{text.splitlines()[0][:300]})")
    if missing:
        return UserError(
            f"could not load model {model!r}: it is neither a local directory/.gguf file nor reachable on "
            "the Hugging Face Hub (no network, empty cache, or a wrong id). Pass a local model directory "
            "or .gguf file, or check the id and your network.\n(underlying error: "
            f"{text.splitlines()[0][:300]})")
    return UserError(f"could not load model {model!r}: {text[:500]}")
