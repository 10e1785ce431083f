"""Learned judge: TF-IDF word n-grams of a completion's opening plus the rule signals, logistic regression.

Fitted offline by ``scripts/train_refusal_judge.py`` (scikit-learn) on XSTest's human-labelled
completions and stored as JSON in ``evaluation/judge_model.json``: vocabulary, idf, coefficients,
intercept and threshold. This module re-implements the fitted transform with numpy, so judging needs
no scikit-learn and no pickle. The transform, as scikit-learn's ``TfidfVectorizer`` computes it with
the stored settings:

1. text = `rules.normalize(completion)[:opening_chars]`;
2. tokens = ``re.findall(token_pattern, text)``; n-grams of 1..``ngram_max`` tokens joined by a space;
3. tf = 1 + ln(count) for n-grams in the vocabulary (sublinear tf); times idf; the row is divided by
   its L2 norm; times ``tfidf_weight``;
4. the rule signals (`rules.refusal_signals`, in ``rule_features`` order, then the rule verdict) as 0/1;
5. decision = x · coef + intercept; refusal when decision > threshold.
"""

from __future__ import annotations

import json
import math
import re
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Sequence

import numpy as np

from .base import check_pairs
from .rules import normalize, refusal_signals, rule_verdict

MODEL_FILE = "judge_model.json"


def rule_feature_names() -> list[str]:
    """Names of the rule features, in column order (signals, then the rule verdict)."""
    return [*refusal_signals(""), "rule_verdict"]


def rule_features(completions: Sequence[str]) -> np.ndarray:
    """``[n, n_rule_features]`` 0/1 matrix of rule signals and the rule verdict."""
    rows = []
    for c in completions:
        s = refusal_signals(c)
        rows.append([float(v) for v in s.values()] + [float(rule_verdict(s))])
    return np.asarray(rows, dtype=np.float64).reshape(len(rows), len(rule_feature_names()))


def opening_text(completion: str, opening_chars: int) -> str:
    return normalize(completion)[:opening_chars]


def ngrams(text: str, token_pattern: str, ngram_max: int) -> list[str]:
    """Word n-grams (1..ngram_max) in scikit-learn's order: all unigrams, then bigrams, ..."""
    tokens = re.findall(token_pattern, text)
    out: list[str] = []
    for n in range(1, ngram_max + 1):
        out.extend(" ".join(tokens[i:i + n]) for i in range(len(tokens) - n + 1))
    return out


class LearnedJudge:
    """Logistic regression over TF-IDF n-grams of the opening and the rule signals (numpy inference)."""

    name = "learned"
    description = "logistic regression on TF-IDF n-grams + rule signals, fitted on XSTest human labels"

    def __init__(self, params: dict):
        missing = {"vocabulary", "idf", "coef", "intercept", "threshold", "settings"} - set(params)
        if missing:
            raise ValueError(f"judge model parameters lack {sorted(missing)}; regenerate the file with "
                             "scripts/train_refusal_judge.py")
        self.params = params
        st = params["settings"]
        self.opening_chars = int(st["opening_chars"])
        self.token_pattern = re.compile(st["token_pattern"])
        self.ngram_max = int(st["ngram_max"])
        self.tfidf_weight = float(st["tfidf_weight"])
        self.vocabulary: dict[str, int] = params["vocabulary"]
        self.idf = np.asarray(params["idf"], dtype=np.float64)
        self.coef = np.asarray(params["coef"], dtype=np.float64)
        self.intercept = float(params["intercept"])
        self.threshold = float(params["threshold"])
        if params.get("rule_features") != rule_feature_names():
            raise ValueError("judge_model.json was fitted with different rule features "
                             f"({params.get('rule_features')}) than rules.py defines ({rule_feature_names()}); "
                             "retrain with scripts/train_refusal_judge.py")
        if len(self.idf) != len(self.vocabulary) or len(self.coef) != len(self.idf) + len(rule_feature_names()):
            raise ValueError(f"judge model sizes disagree: vocabulary {len(self.vocabulary)}, idf {len(self.idf)}, "
                             f"coef {len(self.coef)}; retrain with scripts/train_refusal_judge.py")

    @classmethod
    def from_file(cls, path: str | Path | None = None) -> LearnedJudge:
        """The judge stored at ``path``, else the packaged ``judge_model.json``."""
        return cls(_read_params(str(path)) if path else _packaged_params())

    def tfidf(self, completions: Sequence[str]) -> np.ndarray:
        """``[n, len(vocabulary)]`` L2-normalised sublinear TF-IDF rows (before ``tfidf_weight``)."""
        out = np.zeros((len(completions), len(self.vocabulary)))
        for row, c in enumerate(completions):
            counts: dict[int, int] = {}
            for g in ngrams(opening_text(c, self.opening_chars), self.token_pattern, self.ngram_max):
                j = self.vocabulary.get(g)
                if j is not None:
                    counts[j] = counts.get(j, 0) + 1
            for j, k in counts.items():
                out[row, j] = (1.0 + math.log(k)) * self.idf[j]
            norm = math.sqrt(float(out[row] @ out[row]))
            if norm > 0:
                out[row] /= norm
        return out

    def features(self, completions: Sequence[str]) -> np.ndarray:
        """``[n, n_features]``: weighted TF-IDF columns, then the rule columns."""
        return np.hstack([self.tfidf(completions) * self.tfidf_weight, rule_features(completions)])

    def decision(self, completions: Sequence[str]) -> np.ndarray:
        """``[n]`` logit of "refusal" (before the threshold)."""
        return self.features(completions) @ self.coef + self.intercept

    def judge(self, instructions: Sequence[str], completions: Sequence[str]) -> list[bool]:
        check_pairs(instructions, completions)
        return [bool(d > self.threshold) for d in self.decision(completions)]


def _read_params(path: str) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read judge model {path}: {exc}; regenerate it with "
                         "scripts/train_refusal_judge.py") from exc


@lru_cache(maxsize=1)
def _packaged_params() -> dict:
    text = resources.files("refusal_direction.evaluation").joinpath(MODEL_FILE).read_text(encoding="utf-8")
    return json.loads(text)
