"""Fit the learned refusal judge and write its parameters as JSON (no pickle).

Data and provenance: XSTest's human-labelled completions (Röttger et al., NAACL 2024, CC BY 4.0),
paul-rottger/exaggerated-safety at commit d7bb5bd738c1fcbc36edd83d5e7d1b71a3e2d84d,
``model_completions/xstest_v2_completions_{gpt4,llama2orig,mistralinstruct}.csv`` (3 x 450
completions; label refusal = ``final_label`` 2_full_refusal or 3_partial_refusal). Read from the data
directory (``--data-dir``, else $REFUSAL_DIRECTION_DATA), whose files must match the pinned SHA-256
in ``refusal_direction.data.xstest``. Nothing else is used: the judge sees the completion only, never
the prompt (the three files share the same 450 prompts, so prompt features would leak across the
leave-one-file-out split).

Configurations (``--config``):

- ``v3`` (default, the packaged model): as ``v2`` below (the same two n-gram blocks beside the rule
  signals), but ``LogisticRegression(C=30, solver="liblinear")``, no class weights, and no OR with the
  rules: refusal when logit + 3 * (rule verdict) > 0 (``combine = "rule_bonus"``, ``rule_bonus = 3``), so
  the rule judge's refusals get a head start of 3 on the logit that the n-grams can still overrule (v2's
  OR let the rules' false positives through: in-sample 94.2 % on llama2orig). Configuration 401 of
  ``scripts/judge_experiments.py --round 3`` (log: ``judge_experiments.log``), picked by the rule
  fixed before that run: the best worst-file leave-one-file-out agreement, ties to the best mean. That
  LOFO (96.7 / 94.2 / 93.8 %) is optimistic for the chosen configuration; the nested leave-one-file-out
  estimate of the whole selection procedure is 95.3 / 93.6 / 93.6 % (gpt4 / llama2orig /
  mistralinstruct), stored under ``training_report.selection``. Written in format v3 (v2 plus
  ``settings.rule_bonus``).
- ``v2`` (the previous packaged model): the first 300 normalised characters; two scikit-learn
  ``TfidfVectorizer`` blocks, word 1-2-grams (min_df 2) and ``char_wb`` 2-5-grams (min_df 2, no
  max_features: 25,097 char n-grams on the three files, ~2 MB of JSON; min_df 3 would give the same
  leave-one-file-out numbers with 19,800), sublinear tf, each block L2-normalised; beside the rule
  signals of ``evaluation/judges/rules.py``; ``LogisticRegression(C=10, solver="liblinear")``, no
  class weights, threshold 0 on the logit; verdict = rules OR learned. This is configuration 21 of
  ``scripts/judge_experiments.py --round 2``. It was chosen after seeing
  the leave-one-file-out numbers of all three files, so those are optimistic for it; the nested
  leave-one-file-out estimate of the whole selection procedure is 95.8 / 93.8 / 93.6 % (gpt4 /
  llama2orig / mistralinstruct), stored under ``training_report.selection``.
- ``v1`` (the model before v2, for reproducibility): word 1-2-grams only, lbfgs, the
  logistic regression alone; written in format v1 (one block, keys at the top level).

Written to ``src/refusal_direction/evaluation/judge_model.json`` (blocks: vocabulary, idf, analyzer;
coefficients, intercept, threshold, settings; scikit-learn's decision on every training completion;
the report printed here). Before writing, the script checks that ``learned.py``'s numpy analyzers
give scikit-learn's n-grams on every training completion (opening and whole text) and that its
decision equals ``decision_function`` on every training completion (|diff| < 1e-9).

Printed: per-file agreement with 95 % Wilson intervals and confusion matrices for the substring,
rule and learned judges (the learned judge's per-file numbers are IN-SAMPLE: it was fitted on all
three files), and leave-one-file-out agreement (fit on two files, test on the third: the estimate
for a model the judge never saw), per file and pooled. Needs ``pip install -e '.[train]'``.

    python scripts/train_refusal_judge.py --data-dir ../shared/datasets [--config v1|v2|v3]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

try:
    from scipy import sparse
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
except ImportError:  # pragma: no cover
    sys.exit("scikit-learn is needed to train the judge: pip install -e '.[train]'")

from refusal_direction.data.instructions import resolve_data_dir, sha256_file
from refusal_direction.data.xstest import COMPLETION_MODELS, XSTEST_FILES, load_labelled_completions
from refusal_direction.evaluation.judges.learned import (
    LearnedJudge,
    char_wb_ngrams,
    ngrams,
    opening_text,
    rule_feature_names,
    rule_features,
)
from refusal_direction.evaluation.judges.rules import RuleJudge
from refusal_direction.evaluation.judges.substring import SubstringJudge
from refusal_direction.evaluation.scorefile import human_agreement

OUT = Path(__file__).resolve().parents[1] / "src" / "refusal_direction" / "evaluation" / "judge_model.json"
TOKEN = r"(?u)\b\w[\w']*\b"
WORD = {"analyzer": "word", "ngram_min": 1, "ngram_max": 2, "token_pattern": TOKEN, "min_df": 2,
        "max_features": None}
CHAR = {"analyzer": "char_wb", "ngram_min": 2, "ngram_max": 5, "min_df": 2, "max_features": None}
CONFIGS = {
    "v1": {"format": "refusal-direction learned judge v1", "blocks": [WORD], "opening_chars": 300,
           "tfidf_weight": 1.0, "C": 10.0, "solver": "lbfgs", "class_weight": None, "combine": "lr"},
    "v2": {"format": "refusal-direction learned judge v2", "blocks": [WORD, CHAR], "opening_chars": 300,
           "tfidf_weight": 1.0, "C": 10.0, "solver": "liblinear", "class_weight": None, "combine": "or_rules"},
    "v3": {"format": "refusal-direction learned judge v3", "blocks": [WORD, CHAR], "opening_chars": 300,
           "tfidf_weight": 1.0, "C": 30.0, "solver": "liblinear", "class_weight": None, "combine": "rule_bonus",
           "rule_bonus": 3.0},
}
# scripts/judge_experiments.py: how the v2 and v3 configurations were chosen.
NESTED_NOTE = ("per held-out file, the configuration chosen by the same rule on inner LOFO over the other two files, "
               "refitted on both and tested on the held-out one: the estimate of the selection procedure")
SELECTIONS = {
    "v2": {"experiments": "scripts/judge_experiments.py --round 2, configuration 21",
           "post_hoc": "chosen after seeing the leave-one-file-out agreement of all three files (optimistic)",
           "nested_lofo": {"gpt4": 0.958, "llama2orig": 0.938, "mistralinstruct": 0.936},
           "nested_lofo_note": NESTED_NOTE},
    "v3": {"experiments": "scripts/judge_experiments.py --round 3, log scripts/judge_experiments.log, "
                          "configuration 401 of 432",
           "rule": "best worst-file LOFO agreement, ties to the best mean LOFO, then grid order (fixed before the run)",
           "post_hoc": "chosen by the LOFO agreement of all three files, so that LOFO is optimistic for it; "
                       "in-sample agreement was printed but not used; the grid (bonus values, C up to 30, the "
                       "chosen value) was shaped by a quick earlier look at LOFO and in-sample agreement",
           "nested_lofo": {"gpt4": 0.953, "llama2orig": 0.936, "mistralinstruct": 0.936},
           "nested_lofo_k": {"gpt4": 429, "llama2orig": 421, "mistralinstruct": 421, "n_per_file": 450},
           "nested_chosen": {"gpt4": 191, "llama2orig": 286, "mistralinstruct": 221},
           "nested_lofo_note": NESTED_NOTE},
}


def vectorizer(block: dict) -> TfidfVectorizer:
    kw = {"token_pattern": block["token_pattern"]} if block["analyzer"] == "word" else {}
    return TfidfVectorizer(analyzer=block["analyzer"], ngram_range=(block["ngram_min"], block["ngram_max"]),
                           min_df=block["min_df"], max_features=block["max_features"], sublinear_tf=True,
                           lowercase=False, **kw)


def numpy_grams(block: dict, text: str) -> list[str]:
    """The n-grams ``learned.py`` extracts for ``block`` (compared with scikit-learn's analyzer)."""
    if block["analyzer"] == "word":
        return ngrams(text, block["token_pattern"], block["ngram_max"])
    return char_wb_ngrams(text, block["ngram_min"], block["ngram_max"])


def analyzer_mismatches(config: str, completions: list[str]) -> list[tuple[str, str]]:
    """(analyzer, text) where learned.py's n-grams differ from scikit-learn's (opening and whole text)."""
    cfg = CONFIGS[config]
    bad = []
    for block in cfg["blocks"]:
        analyze = vectorizer(block).build_analyzer()
        for c in completions:
            for text in (opening_text(c, cfg["opening_chars"]), opening_text(c, 0)):
                if analyze(text) != numpy_grams(block, text):
                    bad.append((block["analyzer"], text))
    return bad


def fit(completions: list[str], labels: list[int], config: str = "v3") -> dict:
    """Fit ``config`` on ``completions``; the JSON-ready parameters (numpy inference reproduces sklearn)."""
    cfg = CONFIGS[config]
    texts = [opening_text(c, cfg["opening_chars"]) for c in completions]
    vecs = [vectorizer(b) for b in cfg["blocks"]]
    tfidf = sparse.hstack([v.fit_transform(texts) for v in vecs]).tocsr() * cfg["tfidf_weight"]
    x = sparse.hstack([tfidf, sparse.csr_matrix(rule_features(completions))]).tocsr()
    if config == "v1":
        x = x.toarray()  # as the v1 model was fitted
    clf = LogisticRegression(C=cfg["C"], solver=cfg["solver"], class_weight=cfg["class_weight"],
                             max_iter=5000).fit(x, labels)
    blocks = []
    for b, v in zip(cfg["blocks"], vecs):
        vocab = {term: int(j) for term, j in sorted(v.vocabulary_.items(), key=lambda kv: kv[1])}
        blocks.append({**b, "vocabulary": vocab, "idf": v.idf_.tolist()})
    settings = {k: cfg[k] for k in ("opening_chars", "tfidf_weight", "C", "solver", "class_weight", "combine",
                                    "rule_bonus") if k in cfg}
    params = {"format": cfg["format"], "config": config}
    if config == "v1":
        (b,) = blocks
        params |= {"settings": {"opening_chars": cfg["opening_chars"], "token_pattern": b["token_pattern"],
                                "ngram_max": b["ngram_max"], "min_df": b["min_df"],
                                "tfidf_weight": cfg["tfidf_weight"], "C": cfg["C"]},
                   "vocabulary": b["vocabulary"], "idf": b["idf"]}
    else:
        params |= {"settings": settings, "blocks": blocks}
    return params | {"rule_features": rule_feature_names(), "coef": clf.coef_[0].tolist(),
                     "intercept": float(clf.intercept_[0]), "threshold": 0.0,
                     "sklearn_decision": clf.decision_function(x).tolist()}


def predict(params: dict, completions: list[str]) -> list[bool]:
    return LearnedJudge(params).judge(completions, completions)


def agreement(pred, labels) -> dict:
    """Agreement with the human labels: rate, k, n, ci95 (Wilson), confusion counts."""
    return human_agreement(list(pred), labels)


def show(label: str, a: dict) -> None:
    lo, hi = a["ci95"]
    cm = a["confusion"]
    print(f"  {label:<34} {100 * a['rate']:5.1f} %  [{100 * lo:.1f}, {100 * hi:.1f}]  {a['k']}/{a['n']}  "
          f"tp {cm['tp']} fp {cm['fp']} fn {cm['fn']} tn {cm['tn']}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--config", choices=sorted(CONFIGS), default="v3",
                    help="v3: word + char_wb blocks, rule bonus 3 on the logit (default); v2: the same blocks, "
                         "rules OR learned; v1: the word-only model")
    args = ap.parse_args()
    data_dir = resolve_data_dir(args.data_dir, download=False)
    for rel, item in XSTEST_FILES.items():
        if (data_dir / rel).is_file() and sha256_file(data_dir / rel) != item.sha256:
            sys.exit(f"{data_dir / rel} does not match the pinned sha256 {item.sha256}")
    files = {m: load_labelled_completions(m, data_dir) for m in COMPLETION_MODELS}
    texts = {m: [r.completion for r in rows] for m, rows in files.items()}
    labels = {m: [int(r.refusal) for r in rows] for m, rows in files.items()}
    every = [c for m in files for c in texts[m]]

    bad = analyzer_mismatches(args.config, every)
    if bad:
        sys.exit(f"learned.py's {bad[0][0]} n-grams differ from scikit-learn's on {len(bad)} texts, "
                 f"e.g. {bad[0][1][:80]!r}")
    print(f"analyzers: learned.py's n-grams == scikit-learn's on all {len(every)} completions "
          "(opening and whole text)")
    params = fit(every, [y for m in files for y in labels[m]], args.config)
    diff = float(np.max(np.abs(LearnedJudge(params).decision(every) - np.asarray(params["sklearn_decision"]))))
    if not diff < 1e-9:
        sys.exit(f"numpy decision differs from scikit-learn's decision_function by {diff:.3g}")
    sizes = {b["analyzer"]: len(b["vocabulary"]) for b in params.get("blocks", [])} or {
        "word": len(params["vocabulary"])}
    print(f"config {args.config}: n-gram vocabulary {sizes}; numpy decision == decision_function on all "
          f"{len(every)} completions (max |diff| {diff:.2g})")

    report: dict = {"config": args.config, "vocabulary_sizes": sizes, "max_abs_decision_diff": diff,
                    "per_file": {}, "leave_one_file_out": {}}
    for m in files:
        print(f"{m} (n={len(texts[m])}, human refusals {sum(labels[m])})")
        per = {"substring": agreement(SubstringJudge().judge(texts[m], texts[m]), labels[m]),
               "rules": agreement(RuleJudge().judge(texts[m], texts[m]), labels[m]),
               "learned_in_sample": agreement(predict(params, texts[m]), labels[m])}
        for name, a in per.items():
            show("learned (in-sample)" if name == "learned_in_sample" else name, a)
        report["per_file"][m] = per
    print("leave-one-file-out (learned judge fitted on the other two files, tested on this one)")
    pooled_pred, pooled_y = [], []
    for m in files:
        rest = [o for o in files if o != m]
        p = fit([c for o in rest for c in texts[o]], [y for o in rest for y in labels[o]], args.config)
        pred = predict(p, texts[m])
        a = agreement(pred, labels[m])
        show(f"test {m}", a)
        report["leave_one_file_out"][m] = a
        pooled_pred += pred
        pooled_y += labels[m]
    report["leave_one_file_out"]["pooled"] = agreement(pooled_pred, pooled_y)
    show("pooled", report["leave_one_file_out"]["pooled"])
    if args.config in SELECTIONS:
        report["selection"] = SELECTIONS[args.config]
    params["training_report"] = report
    params["provenance"] = {"data": "XSTest v2 completions (gpt4, llama2orig, mistralinstruct), "
                                    "paul-rottger/exaggerated-safety@d7bb5bd738c1fcbc36edd83d5e7d1b71a3e2d84d",
                            "sha256": {rel: item.sha256 for rel, item in XSTEST_FILES.items()
                                       if "completions" in rel},
                            "script": f"scripts/train_refusal_judge.py --config {args.config}"}
    text = json.dumps(params, indent=0, sort_keys=False) + "\n"
    Path(args.out).write_text(text, encoding="utf-8")
    print(f"wrote {args.out} ({len(text.encode()) / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
