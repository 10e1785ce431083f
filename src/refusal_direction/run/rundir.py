"""The run directory: its paths, creating and reopening it, environment.json, timings.json and run.log.

Every file of a run lives under one directory (layout: README, "Run directory"); `Run` names them,
loads the model lazily, once, and records the environment the first time it does.
"""

from __future__ import annotations

import json
import logging
import platform
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .. import __version__
from ..config import RunConfig, build_config
from ..errors import UserError
from ..fileio import atomic_write_json

RUN_LOG = "run.log"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# condition -> (dataset key, intervention name in file names)
CONDITION_FILES = {
    "baseline": ("eval", "baseline"),
    "ablation": ("eval", "ablation"),
    "actadd_negative": ("eval", "actadd_negative"),
    "harmless_baseline": ("harmless_eval", "baseline"),
    "harmless_actadd": ("harmless_eval", "actadd"),
    # XSTest (config xstest): over-refusal on safe prompts, and its unsafe contrast prompts
    "xstest_safe_baseline": ("xstest_safe", "baseline"),
    "xstest_safe_ablation": ("xstest_safe", "ablation"),
    "xstest_safe_actadd": ("xstest_safe", "actadd"),
    "xstest_unsafe_baseline": ("xstest_unsafe", "baseline"),
    "xstest_unsafe_ablation": ("xstest_unsafe", "ablation"),
}


@dataclass
class Run:
    """A run directory with its config; loads the model lazily, once."""

    out: Path
    config: RunConfig
    progress: bool = False
    loader: Callable[[RunConfig], object] | None = None  # tests inject tiny models here
    _lm: object = field(default=None, repr=False)

    # paths
    @property
    def samples_dir(self) -> Path:
        return self.out / "samples"

    @property
    def direction_path(self) -> Path:
        return self.out / "direction.safetensors"

    @property
    def candidates_path(self) -> Path:
        return self.out / "directions" / "candidates.safetensors"

    @property
    def summary_path(self) -> Path:
        return self.out / "summary.json"

    def completions_path(self, condition: str) -> Path:
        dataset_key, name = CONDITION_FILES[condition]
        return self.out / "completions" / f"{self.dataset_name(dataset_key)}__{name}.jsonl"

    def dataset_name(self, key: str) -> str:
        if key.startswith("xstest_"):
            return key
        spec = self.config.eval if key == "eval" else "harmless"
        return Path(spec).stem if key == "eval" else spec

    @property
    def lm(self):
        if self._lm is None:
            if self.loader is not None:
                self._lm = self.loader(self.config)
            else:
                from ..core.model import load_model

                c = self.config
                self._lm = load_model(c.model, device=c.device, dtype=c.dtype, revision=c.revision,
                                      chat_template=Path(c.chat_template).read_text() if c.chat_template else None)
            write_environment(self)
        return self._lm

    def release_model(self) -> None:
        self._lm = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def timing(self, key: str, seconds: float) -> None:
        path = self.out / "timings.json"
        data = json.loads(path.read_text()) if path.is_file() else {}
        data[key] = round(seconds, 3)
        atomic_write_json(path, data)

    def saved_direction(self):
        """The run's direction (direction.safetensors), checked against the run's model."""
        from ..core.directions import load_direction

        if not self.direction_path.is_file():
            raise UserError(f"{self.out} has no direction yet; run `refusal-direction replicate --out {self.out}` "
                            "first")
        return load_direction(self.direction_path, model_id=self.config.model)


def config_mismatch(out: Path, config: RunConfig) -> str | None:
    """Why ``out`` cannot hold a run of ``config`` (it belongs to another configuration), or None."""
    cfg_path = Path(out) / "config.json"
    if not cfg_path.is_file():
        return None
    saved = json.loads(cfg_path.read_text())
    if saved.get("fingerprint") == config.fingerprint():
        return None
    old = saved.get("config", {})
    diff = sorted(k for k, v in config.to_dict().items() if old.get(k) != v)
    return (f"output directory {out} belongs to a run with a different configuration (differs in: "
            f"{', '.join(diff) or 'version'}); use another --out, or --force to discard its results")


def prepare_run(out: str | Path, config: RunConfig, force: bool = False, progress: bool = False,
                loader=None) -> Run:
    """Create or reopen ``out`` for ``config``; refuse a directory that belongs to another config."""
    out = Path(out)
    cfg_path = out / "config.json"
    if cfg_path.is_file():
        mismatch = config_mismatch(out, config)
        if mismatch is not None:
            if not force:
                raise UserError(mismatch)
            clear_outputs(out)
    elif out.exists() and any(p.name != RUN_LOG for p in out.iterdir()) and not force:
        raise UserError(f"output directory {out} exists and is not a run directory; use another --out or --force")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(cfg_path, {"fingerprint": config.fingerprint(), "config": config.to_dict(),
                                 "refusal_direction_version": __version__})
    return Run(out, config, progress, loader)


def open_run(out: str | Path, overrides: dict | None = None, progress: bool = False, loader=None) -> Run:
    """Reopen an existing run directory with its saved config (``overrides`` for non-result fields)."""
    out = Path(out)
    cfg_path = out / "config.json"
    if not cfg_path.is_file():
        raise UserError(f"{out} is not a run directory (no config.json); create one with "
                        "`refusal-direction replicate --out DIR`")
    saved = json.loads(cfg_path.read_text())["config"]
    config = build_config(overrides or {}, base=saved)
    return Run(out, config, progress, loader)


def clear_outputs(out: Path) -> None:
    """Delete every result in ``out`` (run.log is kept: it records the whole history of the directory)."""
    for child in out.iterdir():
        if child.name == RUN_LOG:
            continue
        if child.is_dir():
            shutil.rmtree(child)
        else:
            child.unlink()


def log_to_run_dir(out: Path, logger: logging.Logger) -> logging.Handler:
    """Append ``logger``'s records to ``out``/run.log (``out`` is created); returns the handler added."""
    out.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(out / RUN_LOG)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logger.addHandler(handler)
    return handler


def write_environment(run: Run) -> None:
    lm = run._lm
    import transformers

    env = {
        "refusal_direction": __version__, "git_commit": _git_commit(), "python": platform.python_version(),
        "platform": platform.platform(), "torch": torch.__version__, "transformers": transformers.__version__,
        "device": str(lm.device), "dtype": str(lm.dtype).replace("torch.", ""), "dtype_reason": lm.dtype_reason,
        "cuda_device": torch.cuda.get_device_name(lm.device) if lm.device.type == "cuda" else None,
        "model": lm.model_id, "n_layers": lm.n_layers, "d_model": lm.d_model,
        "chat_format": {"prefix": lm.chat.prefix, "suffix": lm.chat.suffix, "source": lm.chat.source},
        "post_instruction_tokens": lm.post_instruction_tokens(),
    }
    atomic_write_json(run.out / "environment.json", env)


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
