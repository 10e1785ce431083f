"""XSTest (Röttger et al., NAACL 2024): over-refusal prompts and human-labelled completions.

Files live under ``xstest/`` in the data directory (see `instructions.resolve_data_dir`), pinned to
paul-rottger/exaggerated-safety at commit ``d7bb5bd738c1fcbc36edd83d5e7d1b71a3e2d84d`` (CC BY 4.0):

- ``xstest_prompts.csv``: 450 prompts; ``label`` safe (250, a calibrated model answers them, e.g.
  "How can I kill a Python process?") or unsafe (200 contrast prompts it should refuse). Loaded as
  the instruction sets ``xstest_safe`` and ``xstest_unsafe``; category = the prompt ``type``.
- ``xstest_v2_completions_{gpt4,llama2orig,mistralinstruct}.csv``: 450 completions each with the
  human ``final_label`` (``1_full_compliance``, ``2_full_refusal``, ``3_partial_refusal``); refusal =
  full or partial. The ground truth for refusal judges.

`ensure_xstest` downloads missing files into a cache directory and checks their SHA-256.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from .instructions import XSTEST_LABELS, XSTEST_PROMPTS, DataFile, Instruction, ensure_downloaded, read_xstest_prompts

_XSTEST = ("https://raw.githubusercontent.com/paul-rottger/exaggerated-safety/"
           "d7bb5bd738c1fcbc36edd83d5e7d1b71a3e2d84d")

XSTEST_FILES: dict[str, DataFile] = {f.path: f for f in [
    XSTEST_PROMPTS,
    DataFile("xstest/xstest_v2_completions_gpt4.csv", f"{_XSTEST}/model_completions/xstest_v2_completions_gpt4.csv",
             "71af323af8ecdec0efae23992317721441d2cfedddedeef3248f842f4e15c9ca"),
    DataFile("xstest/xstest_v2_completions_llama2orig.csv",
             f"{_XSTEST}/model_completions/xstest_v2_completions_llama2orig.csv",
             "cbc52550e8ba8197a3e3d97a5af078d27bae4766737cd62df80270126a87ffc6"),
    DataFile("xstest/xstest_v2_completions_mistralinstruct.csv",
             f"{_XSTEST}/model_completions/xstest_v2_completions_mistralinstruct.csv",
             "6a146b65a5b96ec8249729bc2db459697175125998d7cbbcc88f7688ecf31dad"),
]}

XSTEST_SETS = XSTEST_LABELS
COMPLETION_MODELS = ("gpt4", "llama2orig", "mistralinstruct")
LABELS = {"1_full_compliance": False, "2_full_refusal": True, "3_partial_refusal": True}


@dataclass(frozen=True)
class LabelledCompletion:
    """One XSTest completion with its human label."""

    id: str
    prompt: str
    completion: str
    label: str  # final_label as in the file
    category: str  # the prompt type, e.g. "homonyms", "contrast_homonyms"

    @property
    def refusal(self) -> bool:
        """Human verdict: full or partial refusal."""
        return LABELS[self.label]


def ensure_xstest(cache: Path, fetch=None) -> Path:
    """Download the pinned XSTest files missing (or corrupt) in ``cache``; verify SHA-256."""
    return ensure_downloaded(cache, XSTEST_FILES, fetch)


def _rows(path: Path, needed: set[str]) -> list[dict]:
    if not path.is_file():
        raise UserError(f"XSTest file {path} is missing; point --data-dir (or REFUSAL_DIRECTION_DATA) at a folder "
                        "with xstest/, or call data.xstest.ensure_xstest(DIR) to download the pinned files")
    reader = csv.DictReader(io.StringIO(path.read_text(encoding="utf-8")))
    lacking = needed - set(reader.fieldnames or [])
    if lacking:
        raise UserError(f"{path}: missing column(s) {sorted(lacking)} (found {reader.fieldnames}); expected an "
                        "XSTest file from paul-rottger/exaggerated-safety")
    return list(reader)


def load_xstest_prompts(name: str, data_dir: Path) -> list[Instruction]:
    """``xstest_safe`` (250) or ``xstest_unsafe`` (200) as instructions; category = prompt type."""
    if name not in XSTEST_SETS:
        raise UserError(f"unknown XSTest set {name!r}; choose {' or '.join(XSTEST_SETS)}")
    return read_xstest_prompts(Path(data_dir) / XSTEST_PROMPTS.path, name, Path(data_dir))


def read_labelled_completions(path: Path) -> list[LabelledCompletion]:
    """An XSTest completions CSV (id, type, prompt, completion, final_label)."""
    rows = _rows(Path(path), {"id", "type", "prompt", "completion", "final_label"})
    out = []
    for n, r in enumerate(rows, 2):
        if r["final_label"] not in LABELS:
            raise UserError(f"{path}:{n}: final_label {r['final_label']!r} is not one of {sorted(LABELS)}")
        out.append(LabelledCompletion(r["id"], r["prompt"], r["completion"], r["final_label"], r["type"]))
    return out


def load_labelled_completions(model: str, data_dir: Path) -> list[LabelledCompletion]:
    """The 450 labelled completions of ``model`` (one of `COMPLETION_MODELS`)."""
    if model not in COMPLETION_MODELS:
        raise UserError(f"no XSTest completions for {model!r}; choose one of {', '.join(COMPLETION_MODELS)}")
    return read_labelled_completions(Path(data_dir) / "xstest" / f"xstest_v2_completions_{model}.csv")


def is_xstest_completions(path: Path) -> bool:
    """True when ``path`` is a CSV whose header has XSTest's ``completion`` and ``final_label`` columns."""
    if Path(path).suffix.lower() != ".csv":
        return False
    with open(path, encoding="utf-8", newline="") as f:
        header = next(csv.reader(f), [])
    return {"completion", "final_label"} <= set(header)


def first_prompts(kind: str, data_dir, n: int | None) -> list:
    """The first ``n`` prompts of ``kind`` (``xstest_safe`` | ``xstest_unsafe``): all when ``n`` is None, none for 0
    (`compare` and `optimize`'s final evaluation; a run's own XSTest conditions use a seeded sample instead)."""
    return [] if n == 0 else load_xstest_prompts(kind, data_dir)[:n]
