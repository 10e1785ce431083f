"""Every learned-judge configuration tried, with leave-one-file-out (LOFO) and nested LOFO agreement.

Configurations (a grid, all listed in the output; nothing dropped):

- text: the first 300 normalised characters (``open300``) or the full completion (``full``, word
  n-grams only: char n-grams of whole completions were too slow for the 2 shared cores);
- features: word 1-2-grams, char_wb 2-5-grams, or both, beside the rule signals of ``rules.py``;
- C in {1, 10}; class weights none or balanced;
- combine: the logistic regression alone, or "rules OR learned";
- threshold: 0 on the logit, or calibrated inside the training files only (out-of-fold decisions of a
  5-fold GroupKFold over the training rows, grouped by prompt, the accuracy-maximising cut).

Two estimates per configuration and file:

- ``lofo``: fit on the other two files, test on this one (every configuration; selecting the best of
  these by looking at all three files is optimistic);
- ``nested``: for each held-out file, the configuration is chosen by inner LOFO on the two training
  files only (fit on one, test on the other, both ways; mean agreement; ties go to the earlier
  configuration in grid order), refitted on both and tested on the held-out file. This is the honest
  estimate of the whole procedure (selection included) on a model the judge never saw.

The packaged model uses the configuration that the same rule picks on all three files (best mean LOFO;
ties to the earlier one). ``python scripts/judge_experiments.py --data-dir ../shared/datasets --out X.json``
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
# on mean LOFO, once 56.7 % on gpt4); it needs 4x the fits, so round 2 (this grid) runs "zero" only.
THRESHOLDS = ("zero",)
GRID = [dict(zip(("text", "features", "C", "class_weight", "combine", "threshold"), v)) for v in itertools.product(
    TEXTS, FEATURES, (1.0, 10.0), (None, "balanced"), ("lr", "or_rules"), THRESHOLDS)
    if v[0] == "open300" or v[1] == "word"]
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
        """(X_train, X_test) for ``cfg``'s text and features, vectorizers fitted on ``train`` only."""
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
            r_tr = np.vstack([self.rules[m] for m in train])
            self.cache[key] = (sparse.hstack([*blocks_tr, sparse.csr_matrix(r_tr)]).tocsr(),
                               sparse.hstack([*blocks_te, sparse.csr_matrix(self.rules[test])]).tocsr())
        return self.cache[key]


def best_cut(decision: np.ndarray, y: np.ndarray) -> float:
    """The threshold maximising accuracy of ``decision > t`` (midpoints; ties to the one nearest 0)."""
    s = np.unique(decision)
    cands = np.concatenate([[s[0] - 1], (s[1:] + s[:-1]) / 2, [s[-1] + 1]])
    acc = np.array([((decision > t) == y).mean() for t in cands])
    best = np.flatnonzero(acc == acc.max())
    return float(cands[best[np.argmin(np.abs(cands[best]))]])


def decisions(data: Data, cfg: dict, train: tuple[str, ...], test: str) -> tuple[np.ndarray, np.ndarray]:
    """(test decisions, out-of-fold training decisions) of the logistic regression; cached per fit."""
    key = (cfg["text"], cfg["features"], cfg["C"], cfg["class_weight"], train, test)
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
    """Predictions of ``cfg`` fitted on ``train`` for ``test``'s completions."""
    dec, oof = decisions(data, cfg, train, test)
    y = np.concatenate([data.y[m] for m in train])
    cut = 0.0
    if cfg["threshold"] == "inner":
        if cfg["combine"] == "or_rules":
            rv = np.vstack([data.rules[m] for m in train])[:, -1] > 0
            oof = np.where(rv, np.inf, oof)
        cut = best_cut(oof, y)
    pred = dec > cut
    if cfg["combine"] == "or_rules":
        pred = pred | (data.rules[test][:, -1] > 0)
    return pred.astype(int)


def acc(pred: np.ndarray, y: np.ndarray) -> float:
    return float((pred == y).mean())


_DATA: Data | None = None


def _fit_task(task):
    cfg, train, test = task
    return task, decisions(_DATA, cfg, train, test)


def precompute(data: Data, files: list[str], jobs: int) -> None:
    """Every logistic-regression fit the grid needs (outer and inner splits), in ``jobs`` processes."""
    global _DATA
    splits = [(tuple(o for o in files if o != m), m) for m in files]
    splits += [((a,), b) for a in files for b in files if a != b]
    base = {(c["text"], c["features"], c["C"], c["class_weight"]): c for c in GRID}.values()
    tasks = [(cfg, train, test) for cfg in base for train, test in splits]
    _DATA = data
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        for (cfg, train, test), result in pool.imap_unordered(_fit_task, tasks):
            data.fits[(cfg["text"], cfg["features"], cfg["C"], cfg["class_weight"], train, test)] = result
    print(f"{len(tasks)} fits done", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--jobs", type=int, default=1)
    args = ap.parse_args()
    data = Data(resolve_data_dir(args.data_dir, download=False))
    files = list(COMPLETION_MODELS)
    precompute(data, files, args.jobs)
    lofo = {}  # grid index -> {file: accuracy}
    for i, cfg in enumerate(GRID):
        lofo[i] = {m: acc(evaluate(data, cfg, tuple(o for o in files if o != m), m), data.y[m]) for m in files}
        print(f"{i:3d} {cfg}  " + "  ".join(f"{m} {100 * a:.1f}" for m, a in lofo[i].items())
              + f"  mean {100 * np.mean(list(lofo[i].values())):.2f}", flush=True)
    inner = {}  # (held-out file, grid index) -> mean inner LOFO accuracy on the two training files
    for m in files:
        a, b = (o for o in files if o != m)
        for i, cfg in enumerate(GRID):
            inner[m, i] = (acc(evaluate(data, cfg, (a,), b), data.y[b]) + acc(evaluate(data, cfg, (b,), a),
                                                                              data.y[a])) / 2
    nested = {}
    for m in files:
        scores = [inner[m, i] for i in range(len(GRID))]
        pick = int(np.argmax(scores))
        nested[m] = {"chosen": pick, "config": GRID[pick], "inner_mean": scores[pick],
                     "agreement": rate((evaluate(data, GRID[pick], tuple(o for o in files if o != m), m)
                                        == data.y[m]).astype(int).tolist())}
        print(f"nested: held out {m}: chose {pick} {GRID[pick]} (inner {100 * scores[pick]:.2f}) -> "
              f"{100 * nested[m]['agreement']['rate']:.1f} %", flush=True)
    final = int(np.argmax([np.mean(list(lofo[i].values())) for i in range(len(GRID))]))
    print(f"final (best mean LOFO over all three files; optimistic as an estimate): {final} {GRID[final]}")
    if args.out:
        Path(args.out).write_text(json.dumps({"grid": GRID, "lofo": lofo, "nested": nested, "final": final,
                                              "inner": {f"{m}/{i}": v for (m, i), v in inner.items()}}, indent=1))


if __name__ == "__main__":
    main()
