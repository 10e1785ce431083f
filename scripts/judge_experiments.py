"""Every learned-judge configuration tried, with leave-one-file-out (LOFO) and nested LOFO agreement.

Round 2 (``--round 2``; the v2 model is its configuration 21, although
its mean-LOFO pick was 20, the model alone, below 93 % on mistralinstruct):

- text: the first 300 normalised characters (``open300``) or the full completion (``full``, word
  n-grams only: char n-grams of whole completions were too slow for the 2 shared cores);
- features: word 1-2-grams, char_wb 2-5-grams, or both, beside the rule signals of ``rules.py``;
- C in {1, 10}; class weights none or balanced;
- combine: the logistic regression alone, or "rules OR learned";
- threshold: 0 on the logit (round 1 also tried a threshold calibrated inside the training files).
- selection rule: best mean LOFO over the files (``--select mean``).

Round 3 (``--round 3``, the default, log ``judge_experiments.log``; chose the packaged v3 model):

- text ``open300``; features word, char or word+char (beside the rule signals, as before);
- C in {1, 3, 10, 30}; class weights none or balanced; ``tfidf_weight`` (the n-gram blocks times this
  before the fit, i.e. a stronger penalty on the n-grams than on the rule signals) in {1, 0.5};
- ``rule_bonus`` b in {0, 0.5, 1, 1.5, 2, 3, 4, 6, inf}: refusal when logit + b * rule verdict > 0
  (b = 0: the logistic regression alone; b = inf: "rules OR learned" as in v2). b moves the decision
  only for completions the rule judge calls refusals, so the model can still veto the rules' false
  positives when its logit is below -b. It is applied after the fit (no refit per b).
- selection rule (``--select worst``, fixed before the run): the best worst-file LOFO agreement (the
  acceptance of issue #15 is per file), ties to the best mean, then to the earlier configuration in grid
  order (smaller b, then the first in the order above).
- before this grid was fixed, a quick look at word+char, C in {1, 10}, tfidf_weight in {1, 0.5, 0.3} and
  a few bonuses (LOFO and in-sample agreement) showed that a finite bonus can meet both targets; that look
  shaped the bonus values and the C range (C = 30, the grid's largest, was then chosen), so the grid itself
  is not blind to the data. The nested estimate covers the selection inside the grid, not that look.

Two estimates per configuration and file:

- ``lofo``: fit on the other two files, test on this one (every configuration; selecting the best of
  these by looking at all three files is optimistic);
- ``nested``: for each held-out file, the configuration is chosen by the same selection rule on inner
  LOFO over the two training files only (fit on one, test on the other, both ways), refitted on both and
  tested on the held-out file. This is the honest estimate of the whole procedure (selection included)
  on a model the judge never saw.

Round 3 also prints each configuration's in-sample agreement (fitted on all three files and tested on
them): reported only, never used to choose.

The packaged model uses the configuration that the selection rule picks on all three files.
``python scripts/judge_experiments.py --data-dir ../shared/datasets [--round 2|3] [--jobs 2] [--out X.json]``
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np

try:
    from scipy import sparse
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GroupKFold
except ImportError:  # pragma: no cover
    sys.exit("scikit-learn is needed: pip install -e '.[train]'")

from refusal_direction.data.instructions import resolve_data_dir
from refusal_direction.data.xstest import COMPLETION_MODELS, load_labelled_completions
from refusal_direction.evaluation.judges.learned import opening_text, rule_features
from refusal_direction.evaluation.stats import rate

TEXTS = {"open300": 300, "full": 0}
FEATURES = ("word", "char", "word+char")
# Round 1 also tried the threshold "inner" (all 32 open300 word/char configurations: never better than "zero"
# on mean LOFO, once 56.7 % on gpt4); it needs 4x the fits, so rounds 2 and 3 run "zero" only.
THRESHOLDS = ("zero",)
KEYS = ("text", "features", "C", "class_weight", "combine", "threshold")
GRID2 = [dict(zip(KEYS, v)) for v in itertools.product(
    TEXTS, FEATURES, (1.0, 10.0), (None, "balanced"), ("lr", "or_rules"), THRESHOLDS)
    if v[0] == "open300" or v[1] == "word"]
BONUSES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, float("inf"))
GRID3 = [{"text": "open300", "features": f, "C": c, "class_weight": w, "tfidf_weight": t, "combine": "rule_bonus",
          "rule_bonus": b, "threshold": "zero"}
         for f, c, w, t, b in itertools.product(FEATURES, (1.0, 3.0, 10.0, 30.0), (None, "balanced"), (1.0, 0.5),
                                                BONUSES)]
ROUNDS = {2: (GRID2, "mean"), 3: (GRID3, "worst")}
GRID = GRID3
TOKEN = r"(?u)\b\w[\w']*\b"


def vectorizers(features: str) -> list[TfidfVectorizer]:
    out = []
    if "word" in features:
        out.append(TfidfVectorizer(analyzer="word", ngram_range=(1, 2), min_df=2, sublinear_tf=True,
                                   lowercase=False, token_pattern=TOKEN))
    if "char" in features:
        out.append(TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), min_df=2, sublinear_tf=True,
                                   lowercase=False))
    return out


def fit_key(cfg: dict, train: tuple[str, ...], test: str) -> tuple:
    """What one logistic-regression fit depends on (combine and bonus are applied after it)."""
    return (cfg["text"], cfg["features"], cfg["C"], cfg["class_weight"], cfg.get("tfidf_weight", 1.0), train, test)


def bonus_of(cfg: dict) -> float:
    """The rule bonus b: logit + b * rule verdict > cut (or_rules = inf, lr = 0)."""
    return {"lr": 0.0, "or_rules": float("inf")}.get(cfg["combine"], cfg.get("rule_bonus", 0.0))


class Data:
    def __init__(self, data_dir: Path):
        rows = {m: load_labelled_completions(m, data_dir) for m in COMPLETION_MODELS}
        self.texts = {m: [r.completion for r in rs] for m, rs in rows.items()}
        self.y = {m: np.array([int(r.refusal) for r in rs]) for m, rs in rows.items()}
        self.groups = {m: [r.id for r in rs] for m, rs in rows.items()}
        self.rules = {m: rule_features(t) for m, t in self.texts.items()}
        self.cache: dict = {}
        self.fits: dict = {}

    def design(self, cfg: dict, train: tuple[str, ...], test: str):
        """(X_train, X_test) for ``cfg``'s text, features and tf-idf weight, vectorizers fitted on ``train`` only."""
        key = (cfg["text"], cfg["features"], train, test)
        if key not in self.cache:
            n = TEXTS[cfg["text"]]
            prep = (lambda ts: [opening_text(c, n) for c in ts]) if n else (lambda ts: [opening_text(c, 10**9)
                                                                                       for c in ts])
            tr = prep([c for m in train for c in self.texts[m]])
            te = prep(self.texts[test])
            blocks_tr, blocks_te = [], []
            for vec in vectorizers(cfg["features"]):
                blocks_tr.append(vec.fit_transform(tr))
                blocks_te.append(vec.transform(te))
            self.cache[key] = (sparse.hstack(blocks_tr).tocsr(), sparse.hstack(blocks_te).tocsr())
        tf_tr, tf_te = self.cache[key]
        w = cfg.get("tfidf_weight", 1.0)
        r_tr = np.vstack([self.rules[m] for m in train])
        return (sparse.hstack([tf_tr * w, sparse.csr_matrix(r_tr)]).tocsr(),
                sparse.hstack([tf_te * w, sparse.csr_matrix(self.rules[test])]).tocsr())


def best_cut(decision: np.ndarray, y: np.ndarray) -> float:
    """The threshold maximising accuracy of ``decision > t`` (midpoints; ties to the one nearest 0)."""
    s = np.unique(decision)
    cands = np.concatenate([[s[0] - 1], (s[1:] + s[:-1]) / 2, [s[-1] + 1]])
    acc = np.array([((decision > t) == y).mean() for t in cands])
    best = np.flatnonzero(acc == acc.max())
    return float(cands[best[np.argmin(np.abs(cands[best]))]])


def decisions(data: Data, cfg: dict, train: tuple[str, ...], test: str) -> tuple[np.ndarray, np.ndarray]:
    """(test decisions, out-of-fold training decisions) of the logistic regression; cached per fit."""
    key = fit_key(cfg, train, test)
    if key not in data.fits:
        x_tr, x_te = data.design(cfg, train, test)
        y = np.concatenate([data.y[m] for m in train])

        def model():
            return LogisticRegression(C=cfg["C"], class_weight=cfg["class_weight"], max_iter=5000, solver="liblinear")

        groups = [g for m in train for g in data.groups[m]]
        oof = np.zeros(len(y))
        if "inner" in THRESHOLDS:
            for a, b in GroupKFold(n_splits=3).split(x_tr, y, groups):
                oof[b] = model().fit(x_tr[a], y[a]).decision_function(x_tr[b])
        data.fits[key] = (model().fit(x_tr, y).decision_function(x_te), oof)
    return data.fits[key]


def evaluate(data: Data, cfg: dict, train: tuple[str, ...], test: str) -> np.ndarray:
    """Predictions of ``cfg`` fitted on ``train`` for ``test``'s completions (``test`` in ``train``: in-sample)."""
    dec, oof = decisions(data, cfg, train, test)
    y = np.concatenate([data.y[m] for m in train])
    bonus = bonus_of(cfg)
    cut = 0.0
    if cfg["threshold"] == "inner":
        if bonus == float("inf"):
            rv = np.vstack([data.rules[m] for m in train])[:, -1] > 0
            oof = np.where(rv, np.inf, oof)
        cut = best_cut(oof, y)
    rv = data.rules[test][:, -1] > 0
    if bonus == float("inf"):
        return ((dec > cut) | rv).astype(int)
    return (dec + bonus * rv > cut).astype(int)


def acc(pred: np.ndarray, y: np.ndarray) -> float:
    return float((pred == y).mean())


def pick(scores: list[list[float]], select: str) -> int:
    """Index of the best configuration by per-file ``scores``: best mean (``mean``), or best worst file, ties
    to the best mean (``worst``); remaining ties to the earlier configuration."""
    means = [float(np.mean(s)) for s in scores]
    if select == "mean":
        return int(np.argmax(means))
    keys = [(min(s), m) for s, m in zip(scores, means)]
    return max(range(len(scores)), key=lambda i: (keys[i], -i))


_DATA: Data | None = None


def _fit_task(task):
    cfg, train, test = task
    return task, decisions(_DATA, cfg, train, test)


def precompute(data: Data, grid: list[dict], files: list[str], jobs: int, in_sample: bool) -> None:
    """Every logistic-regression fit the grid needs (outer and inner splits), in ``jobs`` processes."""
    global _DATA
    splits = [(tuple(o for o in files if o != m), m) for m in files]
    splits += [((a,), b) for a in files for b in files if a != b]
    if in_sample:
        splits += [(tuple(files), m) for m in files]
    base = {fit_key(c, (), ""): c for c in grid}.values()
    tasks = [(cfg, train, test) for cfg in base for train, test in splits]
    _DATA = data
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        for (cfg, train, test), result in pool.imap_unordered(_fit_task, tasks):
            data.fits[fit_key(cfg, train, test)] = result
    print(f"{len(tasks)} fits done", flush=True)


def _pct(scores: dict) -> str:
    return "  ".join(f"{m} {100 * a:.1f}" for m, a in scores.items())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--round", type=int, choices=sorted(ROUNDS), default=3)
    args = ap.parse_args()
    grid, select = ROUNDS[args.round]
    data = Data(resolve_data_dir(args.data_dir, download=False))
    files = list(COMPLETION_MODELS)
    in_sample = args.round >= 3
    precompute(data, grid, files, args.jobs, in_sample)
    lofo, ins = {}, {}  # grid index -> {file: accuracy}
    for i, cfg in enumerate(grid):
        lofo[i] = {m: acc(evaluate(data, cfg, tuple(o for o in files if o != m), m), data.y[m]) for m in files}
        line = f"{i:3d} {cfg}  {_pct(lofo[i])}  mean {100 * np.mean(list(lofo[i].values())):.2f}"
        if in_sample:
            ins[i] = {m: acc(evaluate(data, cfg, tuple(files), m), data.y[m]) for m in files}
            line += f"  | in-sample {_pct(ins[i])}"
        print(line, flush=True)
    inner = {}  # (held-out file, grid index) -> inner LOFO accuracies on the two training files
    for m in files:
        a, b = (o for o in files if o != m)
        for i, cfg in enumerate(grid):
            inner[m, i] = [acc(evaluate(data, cfg, (a,), b), data.y[b]), acc(evaluate(data, cfg, (b,), a), data.y[a])]
    nested = {}
    for m in files:
        chosen = pick([inner[m, i] for i in range(len(grid))], select)
        nested[m] = {"chosen": chosen, "config": grid[chosen], "inner": inner[m, chosen],
                     "agreement": rate((evaluate(data, grid[chosen], tuple(o for o in files if o != m), m)
                                        == data.y[m]).astype(int).tolist())}
        print(f"nested: held out {m}: chose {chosen} {grid[chosen]} (inner "
              f"{' / '.join(f'{100 * v:.2f}' for v in inner[m, chosen])}) -> "
              f"{100 * nested[m]['agreement']['rate']:.1f} %", flush=True)
    final = pick([list(lofo[i].values()) for i in range(len(grid))], select)
    print(f"final (selection rule '{select}' on the LOFO of all three files; optimistic as an estimate): "
          f"{final} {grid[final]}  {_pct(lofo[final])}")
    if args.out:
        Path(args.out).write_text(json.dumps({"grid": grid, "select": select, "lofo": lofo, "in_sample": ins,
                                              "nested": nested, "final": final,
                                              "inner": {f"{m}/{i}": v for (m, i), v in inner.items()}}, indent=1))


if __name__ == "__main__":
    main()
