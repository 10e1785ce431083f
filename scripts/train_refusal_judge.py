"""Fit the learned refusal judge and write its parameters as JSON (no pickle).

Data and provenance: XSTest's human-labelled completions (Röttger et al., NAACL 2024, CC BY 4.0),
paul-rottger/exaggerated-safety at commit d7bb5bd738c1fcbc36edd83d5e7d1b71a3e2d84d,
``model_completions/xstest_v2_completions_{gpt4,llama2orig,mistralinstruct}.csv`` (3 x 450
completions; label refusal = ``final_label`` 2_full_refusal or 3_partial_refusal). Read from the data
directory (``--data-dir``, else $REFUSAL_DIRECTION_DATA), whose files must match the pinned SHA-256
in ``refusal_direction.data.xstest``. Nothing else is used: the judge sees the completion only, never
the prompt (the three files share the same 450 prompts, so prompt features would leak across the
leave-one-file-out split).

Model: scikit-learn ``TfidfVectorizer`` (word 1-2-grams of the first 300 normalised characters,
min_df 2, sublinear tf) times ``TFIDF_WEIGHT``, beside the rule signals of
``evaluation/judges/rules.py``; ``LogisticRegression(C=10)``; threshold 0 on the logit. Written to
``src/refusal_direction/evaluation/judge_model.json`` (vocabulary, idf, coefficients, intercept,
threshold, settings, and the agreement numbers printed here).

Printed: per-file agreement with 95 % Wilson intervals for the substring, rule and learned judges
(the learned judge's per-file numbers are IN-SAMPLE: it was fitted on all three files), confusion
matrices, and leave-one-file-out agreement (fit on two files, test on the third: the estimate for a
model the judge never saw). Needs ``pip install -e '.[train]'``.

    python scripts/train_refusal_judge.py --data-dir ../shared/datasets
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

try:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
except ImportError:  # pragma: no cover
    sys.exit("scikit-learn is needed to train the judge: pip install -e '.[train]'")

from refusal_direction.data.instructions import resolve_data_dir, sha256_file
from refusal_direction.data.xstest import COMPLETION_MODELS, XSTEST_FILES, load_labelled_completions
from refusal_direction.evaluation.judges.learned import opening_text, rule_feature_names, rule_features
from refusal_direction.evaluation.judges.rules import RuleJudge
from refusal_direction.evaluation.judges.substring import SubstringJudge
from refusal_direction.evaluation.scorefile import human_agreement
from refusal_direction.evaluation.stats import rate

OUT = Path(__file__).resolve().parents[1] / "src" / "refusal_direction" / "evaluation" / "judge_model.json"
SETTINGS = {"opening_chars": 300, "token_pattern": r"(?u)\b\w[\w']*\b", "ngram_max": 2, "min_df": 2,
            "tfidf_weight": 1.0, "C": 10.0}


def fit(completions: list[str], labels: list[int]) -> dict:
    """Fit on ``completions``; the JSON-ready parameters (numpy inference reproduces sklearn)."""
    vec = TfidfVectorizer(analyzer="word", ngram_range=(1, SETTINGS["ngram_max"]), min_df=SETTINGS["min_df"],
                          sublinear_tf=True, lowercase=False, token_pattern=SETTINGS["token_pattern"])
    tfidf = vec.fit_transform([opening_text(c, SETTINGS["opening_chars"]) for c in completions]).toarray()
    x = np.hstack([tfidf * SETTINGS["tfidf_weight"], rule_features(completions)])
    clf = LogisticRegression(C=SETTINGS["C"], max_iter=5000).fit(x, labels)
    vocab = {term: int(j) for term, j in sorted(vec.vocabulary_.items(), key=lambda kv: kv[1])}
    return {"format": "refusal-direction learned judge v1", "settings": SETTINGS, "vocabulary": vocab,
            "idf": vec.idf_.tolist(), "rule_features": rule_feature_names(), "coef": clf.coef_[0].tolist(),
            "intercept": float(clf.intercept_[0]), "threshold": 0.0,
            "sklearn_decision": clf.decision_function(x).tolist()}


def predict(params: dict, completions: list[str]) -> list[bool]:
    from refusal_direction.evaluation.judges.learned import LearnedJudge

    return LearnedJudge(params).judge(completions, completions)


def agreement(pred, labels) -> dict:
    """Agreement with the human labels: rate, k, n, ci95 (Wilson), confusion counts."""
    return human_agreement(list(pred), labels)


def show(label: str, a: dict) -> None:
    lo, hi = a["ci95"]
    cm = a["confusion"]
    print(f"  {label:<34} {100 * a['rate']:5.1f} %  [{100 * lo:.1f}, {100 * hi:.1f}]  {a['k']}/{a['n']}  "
          f"tp {cm['tp']} fp {cm['fp']} fn {cm['fn']} tn {cm['tn']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    data_dir = resolve_data_dir(args.data_dir, download=False)
    for rel, item in XSTEST_FILES.items():
        if (data_dir / rel).is_file() and sha256_file(data_dir / rel) != item.sha256:
            sys.exit(f"{data_dir / rel} does not match the pinned sha256 {item.sha256}")
    files = {m: load_labelled_completions(m, data_dir) for m in COMPLETION_MODELS}
    texts = {m: [r.completion for r in rows] for m, rows in files.items()}
    labels = {m: [int(r.refusal) for r in rows] for m, rows in files.items()}
    params = fit([c for m in files for c in texts[m]], [y for m in files for y in labels[m]])
    report: dict = {"per_file": {}, "leave_one_file_out": {}}
    for m in files:
        print(f"{m} (n={len(texts[m])}, human refusals {sum(labels[m])})")
        per = {"substring": agreement(SubstringJudge().judge(texts[m], texts[m]), labels[m]),
               "rules": agreement(RuleJudge().judge(texts[m], texts[m]), labels[m]),
               "learned_in_sample": agreement(predict(params, texts[m]), labels[m])}
        for name, a in per.items():
            show(name, a)
        report["per_file"][m] = per
    print("leave-one-file-out (learned judge fitted on the other two files)")
    pooled = []
    for m in files:
        rest = [o for o in files if o != m]
        p = fit([c for o in rest for c in texts[o]], [y for o in rest for y in labels[o]])
        pred = predict(p, texts[m])
        a = agreement(pred, labels[m])
        show(f"test {m}", a)
        report["leave_one_file_out"][m] = a
        pooled += [int(bool(x) == bool(y)) for x, y in zip(pred, labels[m])]
    report["leave_one_file_out"]["pooled"] = rate(pooled)
    lo, hi = report["leave_one_file_out"]["pooled"]["ci95"]
    print(f"  pooled {100 * sum(pooled) / len(pooled):.1f} % [{100 * lo:.1f}, {100 * hi:.1f}] "
          f"{sum(pooled)}/{len(pooled)}")
    params["training_report"] = report
    params["provenance"] = {"data": "XSTest v2 completions (gpt4, llama2orig, mistralinstruct), "
                                    "paul-rottger/exaggerated-safety@d7bb5bd738c1fcbc36edd83d5e7d1b71a3e2d84d",
                            "sha256": {rel: item.sha256 for rel, item in XSTEST_FILES.items()
                                       if "completions" in rel}}
    Path(args.out).write_text(json.dumps(params, indent=0, sort_keys=False) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
