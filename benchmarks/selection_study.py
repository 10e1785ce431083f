"""Every candidate direction of a model judged by what it does: the evidence behind the selection rule.

For each difference-in-means candidate (position, layer) below the pruned layers, with the candidate ablated
(the paper's directional ablation):

- greedy answers to the harmful validation prompts and the harmful training prompts, ``--pool-tokens``
  tokens, judged by the substring judge on their first 32 tokens and on all of them, counted separately on
  the prompts the unablated model refuses (the only ones that can show a change);
- greedy answers to the evaluation set (JailbreakBench, the run's ``max_new_tokens``, the paper's stopping),
  substring judge: the number the acceptance is about;
- next-token KL(baseline ‖ ablated) on the harmless evaluation prompts (as `evaluation.capability`).

Every candidate is one condition of one `generation.generate_all` call per prompt set (on CUDA the fast path
stacks their projections, `edits.stacked`). The run directory (samples, candidate directions) is made or
reused as `replicate` would. Output: one JSON file, a row per candidate, plus the baseline counts.

    python benchmarks/selection_study.py --model M --out RUN [--config TOML] --json STUDY.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path


def _judged(lm, gens, refused_at_base, prefix_tokens):
    from refusal_direction.evaluation.refusal import is_refusal

    short = [is_refusal(lm.tokenizer.decode(g.token_ids[:prefix_tokens], skip_special_tokens=True)) for g in gens]
    full = [is_refusal(g.text) for g in gens]
    on = [i for i, r in enumerate(refused_at_base) if r]
    return {"n": len(gens), "n_base_refused": len(on),
            f"refused_{prefix_tokens}": sum(short), "refused_all": sum(full),
            f"refused_{prefix_tokens}_of_base": sum(short[i] for i in on),
            "refused_all_of_base": sum(full[i] for i in on)}


def study(model: str, out: Path, config: Path | None, pool_tokens: int, prefix_tokens: int) -> dict:
    from refusal_direction.config import build_config
    from refusal_direction.edits import Baseline, DirectionalAblation
    from refusal_direction.evaluation.judges import get_judge
    from refusal_direction.evaluation.refusal import is_refusal
    from refusal_direction.generation import generate_all
    from refusal_direction.run.extract import stage_extract, stage_samples
    from refusal_direction.run.pipeline import start_run
    from refusal_direction.search import TrialEvaluator

    cfg = build_config({"model": model, "safety": False}, config)
    run = start_run(out, cfg, progress=True)
    samples = stage_samples(run)
    candidates = stage_extract(run, samples)
    lm, c = run.lm, run.config
    max_layer = int(lm.n_layers * (1 - c.prune_layer_fraction))
    keys = [(p, layer) for p in candidates.positions for layer in range(max_layer)]
    ivs = [Baseline("base")] + [DirectionalAblation(candidates.get(p, layer).vector, name=f"p{p}_l{layer}")
                                for p, layer in keys]
    record: dict = {"model": model, "n_layers": lm.n_layers, "first_pruned_layer": max_layer,
                    "pool_tokens": pool_tokens, "prefix_tokens": prefix_tokens,
                    "max_new_tokens": c.max_new_tokens, "seconds": {}}
    rows = {iv.name: {} for iv in ivs[1:]}
    sets = {"val": [i.text for i in samples.harmful_val], "train": [i.text for i in samples.harmful_train]}
    for name, prompts in sets.items():
        t0 = time.perf_counter()
        gens = generate_all(lm, prompts, ivs, run.generation.replace(max_new_tokens=pool_tokens))
        base = [is_refusal(lm.tokenizer.decode(g.token_ids[:prefix_tokens], skip_special_tokens=True))
                for g in gens["base"]]
        record[f"base_{name}"] = _judged(lm, gens["base"], base, prefix_tokens)
        for iv in ivs[1:]:
            rows[iv.name][name] = _judged(lm, gens[iv.name], base, prefix_tokens)
        record["seconds"][name] = time.perf_counter() - t0
    t0 = time.perf_counter()
    evals = [i.text for i in samples.eval]
    gens = generate_all(lm, evals, ivs, run.generation)
    learned = get_judge("learned")
    for iv in ivs:
        texts = [g.text for g in gens[iv.name]]
        verdicts = learned.judge(evals, texts)
        entry = {"n": len(texts), "substring": sum(map(is_refusal, texts)),
                 "learned": sum(v is not False for v in verdicts)}
        (record.__setitem__("base_eval", entry) if iv.name == "base" else rows[iv.name].__setitem__("eval", entry))
    record["seconds"]["eval"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    kl = TrialEvaluator(lm, [], [i.text for i in samples.harmless_eval], None, None).kl(ivs[1:])
    record["seconds"]["kl"] = time.perf_counter() - t0
    record["candidates"] = [{"position": p, "layer": layer, "kl": k, **rows[f"p{p}_l{layer}"]}
                            for (p, layer), k in zip(keys, kl, strict=True)]
    return record


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True, type=Path, help="run directory (made or reused)")
    ap.add_argument("--config", type=Path, default=None)
    ap.add_argument("--pool-tokens", type=int, default=64)
    ap.add_argument("--prefix-tokens", type=int, default=32)
    ap.add_argument("--json", required=True, type=Path)
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    from refusal_direction.errors import UserError

    t0 = time.perf_counter()
    try:
        rec = study(a.model, a.out, a.config, a.pool_tokens, a.prefix_tokens)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    rec["seconds"]["total"] = time.perf_counter() - t0
    a.json.write_text(json.dumps(rec, indent=1))
    print(f"wrote {a.json}: {len(rec['candidates'])} candidates in {rec['seconds']['total']:.0f} s")


if __name__ == "__main__":
    main()
