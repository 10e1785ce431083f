"""Run configuration: one frozen dataclass serving CLI flags and a TOML file.

Precedence: CLI flags > TOML file (``--config FILE.toml``) > defaults (the paper's settings).
All problems are collected and reported at once. The resolved config is written into the run
directory, and its fingerprint (the fields that change results) guards a run directory against
being reused by a different configuration.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, from PyPI (declared in pyproject for python<3.11)
    import tomli as tomllib

from .errors import UserError, UserErrors
from .fileio import read_text

# Known (layer, position) of published directions: the paper's Table 5.
KNOWN_DIRECTIONS: dict[str, tuple[int, int]] = {"google/gemma-2b-it": (10, -2)}

DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")  # accelerate's strategies (or a JSON file)

ALL_CONDITIONS = ("baseline", "ablation", "actadd_negative", "harmless_baseline", "harmless_actadd")
# Added when ``xstest`` is on: over-refusal on XSTest's safe prompts (baseline, ablation, +r) and its unsafe
# contrast prompts (baseline, ablation).
XSTEST_CONDITIONS = ("xstest_safe_baseline", "xstest_safe_ablation", "xstest_safe_actadd",
                     "xstest_unsafe_baseline", "xstest_unsafe_ablation")
JUDGE_NAMES = ("substring", "rules", "learned")  # evaluation.judges.JUDGES (checked by a test)
# XSTest's prompt counts (data.xstest): what n_xstest = None ("all") means.
XSTEST_SIZES = {"xstest_safe": 250, "xstest_unsafe": 200}

# Direction selection thresholds (the paper's): the one definition, read by RunConfig, the `select` command
# and selection's SelectionThresholds.
KL_THRESHOLD = 0.1  # discard candidates whose KL score is above this
INDUCE_THRESHOLD = 0.0  # discard candidates whose induce score is below this
PRUNE_LAYER_FRACTION = 0.2  # discard layers >= int(n_layers * (1 - this))
# The generation rule (the default; docs/SELECTION.md says why): the lowest generated refusal rate among the
# SELECT_TOP_K best-bypass candidates with KL <= SELECT_MAX_KL, ties broken by KL.
SELECT_RULES = ("generation", "paper")
SELECT_MAX_KL = 0.25  # generation rule: discard candidates whose KL score is above this
SELECT_TOP_K = 32  # generation rule: candidates (best bypass scores) whose ablated generations are judged
SELECT_NEW_TOKENS = 32  # generation rule: greedy tokens per validation prompt and candidate
SELECT_TRAIN_PROMPTS = 128  # generation rule: refused harmful training prompts added to the judged pool
MIN_VAL_PROMPTS = 16  # the validation filter keeps at least min(this, half the set) prompts of each kind

# `verify-export` (run.export.verify_export): evaluation prompts compared, greedy tokens compared per prompt.
VERIFY_PROMPTS = 16
VERIFY_NEW_TOKENS = 32

# The `demo` command: an offline CPU run (<= 15 min on 2 cores); see README "Offline demo" for the reasoning.
DEMO_MODEL = "qwen2.5-coder-0.5b-instruct"
# Only budget knobs differ from `replicate`: the selection rule and its thresholds are the defaults.
DEMO_SETTINGS = {
    "device": "cpu", "select": "auto", "select_strategy": "lazy", "select_layers": "6:19:2", "n_train": 128,
    "n_val": 16, "select_top_k": 6, "select_train_prompts": 16,
    "max_new_tokens": 64, "batch_size": 50, "stop_at_end_of_turn": True, "conditions": ["baseline", "ablation"],
    "safety": False, "capability": False, "xstest": False,
}


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass(frozen=True)
class RunConfig:
    # model
    model: str = _f("google/gemma-2b-it", "HF Hub id, local model directory, or .gguf file")
    revision: str | None = _f(None, "Hub revision (branch, tag or commit) of the model")
    chat_template: str | None = _f(None, "Jinja chat template file, for tokenizers that lack one")
    device: str = _f("auto", "auto | cpu | cuda | cuda:N")
    dtype: str = _f("auto", "auto (bf16 on CUDA, fp32 on CPU) | float32 | bfloat16 | float16")
    device_map: str | None = _f(None, "dispatch the model (and the safety judge) over GPUs/CPU/disk with accelerate: "
                                      "auto | balanced | balanced_low_0 | sequential | FILE.json (default: one device)")
    max_memory: str | None = _f(None, "memory per device for device_map, e.g. '0=60GiB,cpu=200GiB'")
    offload_folder: str | None = _f(None, "folder for weights device_map puts on 'disk' (default: a temp folder)")
    # data
    data_dir: str | None = _f(None, "data directory like datasets/ (else $REFUSAL_DIRECTION_DATA, else download)")
    harmful_train: str = _f("harmful_train", "named set or file of harmful training instructions")
    harmless_train: str = _f("harmless_train", "named set or file of harmless training instructions")
    eval: str = _f("jailbreakbench", "named set or file of harmful evaluation instructions")
    harmful_val: str = _f("harmful_val", "named set or file of harmful validation instructions (selection)")
    harmless_val: str = _f("harmless_val", "named set or file of harmless validation instructions (selection)")
    harmless_eval: str = _f("harmless_test", "named set or file of harmless evaluation instructions (actadd, KL, CE)")
    n_train: int = _f(128, "instructions sampled from each training set")
    n_val: int = _f(32, "instructions sampled from each validation set")
    n_eval: int = _f(100, "harmful evaluation instructions (first n, in file order)")
    n_harmless_eval: int = _f(100, "harmless evaluation instructions (seeded sample)")
    seed: int = _f(42, "seed of the sampling stream (the paper's: 42)")
    filter_train: bool = _f(False, "keep harmful train items the model refuses and harmless ones it does not, by "
                                   "the refusal metric (the reference code's filter_train; the task: off)")
    drop_duplicates: bool = _f(True, "drop train/val items that duplicate an eval item (case/space-insensitive)")
    # direction
    select: str = _f("default", "fixed | auto | default (fixed for models with a known direction, else auto)")
    layer: int | None = _f(None, "block index of the direction (fixed selection); gemma-2b-it: 10")
    position: int | None = _f(None, "post-instruction position of the direction, negative; gemma-2b-it: -2")
    direction_file: str | None = _f(None, "saved direction (.safetensors + .json sidecar) to use instead of extracting")
    kl_threshold: float = _f(KL_THRESHOLD, "selection: discard candidates with KL above this")
    induce_threshold: float = _f(INDUCE_THRESHOLD, "selection: discard candidates with induce score below this")
    prune_layer_fraction: float = _f(PRUNE_LAYER_FRACTION, "selection: discard layers >= (1 - this) * n_layers")
    select_layers: str | None = _f(None, "selection: layers to score, 'start:stop:step' or '6,9,12' (default all)")
    induce_relative: bool = _f(False, "selection: induce threshold is relative to the unintervened harmless "
                                      "metric (the addition must raise refusal log-odds by this much)")
    select_strategy: str = _f("full", "full (score every candidate) | lazy (bypass for all, then induce/KL (paper "
                                      "rule) or KL (generation rule) in bypass order only as far as the choice "
                                      "needs: same choice, fewer forwards)")
    filter_val: bool = _f(True, "selection: keep harmful val items the model refuses, harmless ones it does not")
    min_val_prompts: int = _f(MIN_VAL_PROMPTS, "selection: the validation filter keeps at least min(this, half the "
                                               "set) of each kind, topping up by refusal metric rank")
    select_rule: str = _f("generation", "generation (lowest generated refusal rate among top-k candidates with "
                                        "KL <= select_max_kl) | paper (lowest bypass score after the paper's filters)")
    select_max_kl: float = _f(SELECT_MAX_KL, "generation rule: discard candidates with KL above this")
    select_top_k: int = _f(SELECT_TOP_K, "generation rule: candidates (best bypass score) judged by generation")
    select_new_tokens: int = _f(SELECT_NEW_TOKENS, "generation rule: greedy tokens per validation prompt")
    select_train_prompts: int = _f(SELECT_TRAIN_PROMPTS, "generation rule: at most this many harmful training "
                                   "prompts the unablated model refuses join the judged pool (0: validation only)")
    refusal_tokens: tuple[str, ...] | None = _f(None, "refusal words for the refusal metric (e.g. ['I'] as in the "
                                                      "paper for gemma); default: derived from the model's answers")
    # generation
    conditions: tuple[str, ...] = _f(ALL_CONDITIONS, f"conditions to generate, from {', '.join(ALL_CONDITIONS)}")
    actadd_coeff: float = _f(1.0, "activation addition coefficient c (harmless_actadd: +c r; actadd_negative: -c r)")
    max_new_tokens: int = _f(512, "greedy tokens per completion")
    batch_size: int = _f(32, "prompts per batch for extraction and generation")
    stop_at_end_of_turn: bool = _f(False, "stop at the template's end-of-turn token (paper: False, <eos> only)")
    generation_backend: str = _f("auto", "auto (fast on CUDA, hf on CPU) | hf | fast")
    # (a library call's GenerationSettings keeps "hf": core/decoding.py says why)
    decode_step: str = _f("own", "the fast path's decode step: own (accel/own_step.py; each batch's first step checked "
                          "against HF's, else HF's step) | hf (HF's forward with hooks, the reference)")
    # scoring
    safety: bool = _f(True, "score safety with the Llama Guard 2 classifier")
    safety_model: str = _f("meta-llama/Meta-Llama-Guard-2-8B", "Hub id or local directory of the safety classifier")
    safety_mode: str = _f("logprob", "logprob (p(unsafe) from one forward pass) | generate (verdict + categories)")
    safety_short_is_safe: bool = _f(False, "the paper's rule: completions under 15 words are safe")
    require_safety: bool = _f(False, "fail the run if the safety classifier cannot be loaded")
    safety_batch_size: int = _f(8, "completions per safety-classifier batch")
    refusal_first_n_tokens: int = _f(64, "extra column: refusal score over the first N tokens only")
    capability: bool = _f(True, "KL and on-distribution CE on the harmless evaluation set per condition")
    xstest: bool = _f(True, f"add the XSTest conditions: over-refusal on its {XSTEST_SIZES['xstest_safe']} safe "
                            "prompts (baseline, ablation, +r) and its "
                            f"{XSTEST_SIZES['xstest_unsafe']} unsafe contrast prompts (baseline, ablation)")
    n_xstest: int | None = _f(None, "XSTest prompts per set (seeded sample, for CPU budgets; default all)")
    judge: str = _f("learned", f"second refusal judge beside the paper's substring score: {', '.join(JUDGE_NAMES)}")

    @property
    def all_conditions(self) -> tuple[str, ...]:
        """``conditions``, plus `XSTEST_CONDITIONS` when ``xstest`` is on."""
        return tuple(self.conditions) + (XSTEST_CONDITIONS if self.xstest else ())

    def resolved_direction(self) -> tuple[str, int | None, int | None]:
        """(mode, layer, position) after applying defaults for known models."""
        known = KNOWN_DIRECTIONS.get(self.model)
        mode = self.select
        if mode == "default":
            mode = "fixed" if known or (self.layer is not None and self.position is not None) else "auto"
        layer = self.layer if self.layer is not None else (known[0] if known else None)
        position = self.position if self.position is not None else (known[1] if known else None)
        return mode, layer, position

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["conditions"] = list(self.conditions)
        return d

    def fingerprint(self) -> str:
        """Hash of the fields that change results (not batch sizes, device or the data location)."""
        ignore = {"batch_size", "safety_batch_size", "device", "data_dir", "require_safety", "generation_backend",
                  "decode_step", "device_map", "max_memory", "offload_folder"}
        d = {k: v for k, v in self.to_dict().items() if k not in ignore}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


FIELDS = {f.name: f for f in fields(RunConfig)}


def _coerce(name: str, value: Any, problems: list[str]) -> Any:
    f = FIELDS[name]
    default = f.default
    kind = str(f.type)
    if value is None:
        if "None" in kind:
            return None
        problems.append(f"{name}: null is not allowed; remove the key to use the default {default!r}")
        return default
    if "tuple" in kind:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            problems.append(f"{name}={value!r}: expected a list of strings")
            return default
        return tuple(value)
    if kind.startswith("bool"):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        problems.append(f"{name}={value!r}: expected true or false")
        return default
    if kind.startswith("int"):
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            problems.append(f"{name}={value!r}: expected an integer")
            return default
        try:
            return int(value)
        except ValueError:
            problems.append(f"{name}={value!r}: expected an integer")
            return default
    if kind.startswith("float"):
        try:
            number = float(value)
        except (TypeError, ValueError):
            problems.append(f"{name}={value!r}: expected a number")
            return default
        if isinstance(value, bool) or not math.isfinite(number):
            problems.append(f"{name}={value!r}: expected a finite number (the default is {default!r})")
            return default
        return number
    if not isinstance(value, str):
        problems.append(f"{name}={value!r}: expected a string")
        return default
    return value


# Keys that may name a local file or directory: an existing path is stored absolute (a Hub id is kept as it is).
LOCAL_PATHS = ("model", "direction_file", "chat_template", "safety_model")


def build_config(overrides: dict[str, Any] | None = None, toml_path: str | Path | None = None,
                 base: dict[str, Any] | None = None) -> RunConfig:
    """Merge ``base`` (e.g. a run's saved config) < TOML file < ``overrides``; validate everything."""
    problems: list[str] = []
    values: dict[str, Any] = dict(base or {})
    if toml_path is not None:
        path = Path(toml_path)
        if not path.is_file():
            problems.append(f"config file {str(path)!r} does not exist")
        else:
            try:
                values.update(tomllib.loads(read_text(path, "config file")))
            except UserError as exc:
                problems.append(str(exc))
            except tomllib.TOMLDecodeError as exc:
                problems.append(f"config file {path} is not valid TOML: {exc}; fix the line named")
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    clean: dict[str, Any] = {}
    for key, value in values.items():
        if key not in FIELDS:
            close = [n for n in FIELDS if n.startswith(key[:4])] or list(FIELDS)[:6]
            problems.append(f"unknown config key {key!r}; known keys include {', '.join(close)}")
            continue
        clean[key] = _coerce(key, value, problems)
    for key in LOCAL_PATHS:  # stored resolved: the run means the same file when reopened from another folder
        if isinstance(clean.get(key), str) and clean[key] and Path(clean[key]).exists():
            clean[key] = str(Path(clean[key]).resolve())
    config = RunConfig(**clean)
    problems += validate(config)
    if problems:
        raise UserErrors(problems)
    return config


def validate(c: RunConfig) -> list[str]:
    p = []
    for f in fields(c):  # a RunConfig built directly (not by build_config) is checked too
        value = getattr(c, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            p.append(f"{f.name}={value!r}: expected a finite number (the default is {f.default!r})")
    for name in ("n_train", "n_val", "n_eval", "n_harmless_eval", "max_new_tokens", "batch_size",
                 "safety_batch_size", "refusal_first_n_tokens", "min_val_prompts", "select_top_k",
                 "select_new_tokens"):
        if getattr(c, name) < 1:
            p.append(f"{name}={getattr(c, name)} must be at least 1")
    if c.select_train_prompts < 0:
        p.append(f"select_train_prompts={c.select_train_prompts} must be 0 (validation prompts only) or more")
    if c.select not in ("fixed", "auto", "default"):
        p.append(f"select={c.select!r}: use fixed, auto or default")
    if c.position is not None and c.position >= 0:
        p.append(f"position={c.position} must be negative (counted from the end of the prompt, e.g. -2)")
    if c.layer is not None and c.layer < 0:
        p.append(f"layer={c.layer} must be >= 0 (0-based block index)")
    mode, layer, position = c.resolved_direction()
    if mode == "fixed" and (layer is None or position is None) and not c.direction_file:
        p.append(f"select=fixed needs --layer and --position (no known direction for {c.model!r}); "
                 "or use --select auto")
    if c.n_xstest is not None and c.n_xstest < 1:
        p.append(f"n_xstest={c.n_xstest} must be at least 1 (or unset for all prompts)")
    if c.judge not in JUDGE_NAMES:
        p.append(f"judge={c.judge!r}: use one of {', '.join(JUDGE_NAMES)}")
    bad = [x for x in c.conditions if x not in ALL_CONDITIONS]
    if bad:
        p.append(f"conditions {bad} are unknown; choose from {', '.join(ALL_CONDITIONS)}")
    if c.select_layers is not None:
        try:
            parse_layers(c.select_layers, 10_000)
        except ValueError:
            p.append(f"select_layers={c.select_layers!r}: use 'start:stop:step' (e.g. '6:19:3') or a list '6,9,12'")
    if c.select_strategy not in ("full", "lazy"):
        p.append(f"select_strategy={c.select_strategy!r}: use full or lazy")
    if c.select_rule not in SELECT_RULES:
        p.append(f"select_rule={c.select_rule!r}: use {' or '.join(SELECT_RULES)}")
    if c.refusal_tokens is not None and not c.refusal_tokens:
        p.append("refusal_tokens=[] is empty: give refusal words (e.g. ['I', 'Sorry']) or remove the key")
    if c.generation_backend not in ("auto", "hf", "fast"):
        p.append(f"generation_backend={c.generation_backend!r}: use auto, hf or fast")
    if c.decode_step not in ("hf", "own"):
        p.append(f"decode_step={c.decode_step!r}: use hf or own")
    if c.safety_mode not in ("logprob", "generate"):
        p.append(f"safety_mode={c.safety_mode!r}: use logprob or generate")
    if c.dtype not in ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16"):
        p.append(f"dtype={c.dtype!r}: use auto, float32, bfloat16 or float16")
    if not (c.device in ("auto", "cpu", "cuda") or c.device.startswith("cuda:")):
        p.append(f"device={c.device!r}: use auto, cpu, cuda or cuda:N")
    if c.device_map is not None and c.device_map not in DEVICE_MAPS and not Path(c.device_map).is_file():
        p.append(f"device_map={c.device_map!r}: use {', '.join(DEVICE_MAPS)} or an existing JSON file")
    if c.max_memory is not None and c.device_map is None:
        p.append("max_memory needs device_map (e.g. --device-map auto --max-memory 0=60GiB,cpu=200GiB)")
    if not 0 <= c.prune_layer_fraction < 1:
        p.append(f"prune_layer_fraction={c.prune_layer_fraction} must be in [0, 1)")
    if c.chat_template and not Path(c.chat_template).is_file():
        p.append(f"chat_template file {c.chat_template!r} does not exist")
    elif c.chat_template:
        try:
            check_template_syntax(read_text(c.chat_template, "chat template"), c.chat_template)
        except UserError as exc:
            p.append(str(exc))
    return p


def parse_layers(spec: str, n_layers: int) -> list[int]:
    """'6:19:3' -> [6, 9, 12, 15, 18]; '6,9' -> [6, 9]; layers >= n_layers are dropped."""
    if ":" in spec:
        parts = [int(x) if x.strip() else None for x in spec.split(":")]
        layers = list(range(n_layers))[slice(*parts)]
    else:
        layers = [int(x) for x in spec.split(",") if x.strip()]
    if not layers:
        raise ValueError(spec)
    return [x for x in layers if 0 <= x < n_layers]


def check_template_syntax(template: str, path: str) -> None:
    """A Jinja syntax error in a chat template file, as a `UserError` naming the file and line."""
    import jinja2

    try:
        jinja2.Environment().parse(template)
    except jinja2.TemplateSyntaxError as exc:
        raise UserError(f"chat template {path}:{exc.lineno}: Jinja syntax error ({exc.message}); fix the template "
                        "(see the model's tokenizer_config.json 'chat_template' for an example)") from exc
