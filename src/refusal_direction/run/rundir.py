"""The run directory: creating and reopening it, environment.json, timings.json and run.log.

Every file of a run lives under one directory, whose paths `Run.layout` names (`layout.RunLayout`; README,
"Run directory"); `Run` loads the model lazily, once, records the environment the first time it does, and
carries the run's generation settings (`Run.generation`).
"""

from __future__ import annotations

import logging
import os
import platform
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .. import __version__
from ..config import RunConfig, build_config
from ..core.decoding import GenerationSettings
from ..errors import UserError
from ..fileio import atomic_write_json, read_json
from .layout import RUN_LOG, RunLayout
from .outdir import acquire_lock, check_out_dir, clear_outputs, config_mismatch, read_saved_config

__all__ = ["RUN_LOG", "CONDITION_FILES", "Run", "RunLayout", "clear_outputs", "config_mismatch", "prepare_run",
           "open_run", "log_to_run_dir", "write_environment", "process_age_s"]
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

    @property
    def layout(self) -> RunLayout:
        """Every path of the run directory (`layout.RunLayout`)."""
        return RunLayout(self.out)

    @property
    def generation(self) -> GenerationSettings:
        """The run's generation settings (budget, batch size, stopping, backend, decode step, progress)."""
        return GenerationSettings.from_config(self.config, self.progress)

    def completions_path(self, condition: str) -> Path:
        dataset_key, name = CONDITION_FILES[condition]
        return self.layout.completions(self.dataset_name(dataset_key), name)

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
                check_numerics(self.out, c.device, c.dtype)
                t0 = time.perf_counter()
                self._lm = load_model(c.model, device=c.device, dtype=c.dtype, revision=c.revision,
                                      chat_template=Path(c.chat_template).read_text() if c.chat_template else None,
                                      device_map=c.device_map, max_memory=c.max_memory,
                                      offload_folder=c.offload_folder)
                self.timing("load_model_s", time.perf_counter() - t0)
            write_environment(self)
        return self._lm

    def release_model(self) -> None:
        self._lm = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def timing(self, key: str, seconds: float) -> None:
        path = self.layout.timings
        data = read_json(path, "run file") if path.is_file() else {}
        data[key] = round(seconds, 3)
        atomic_write_json(path, data)

    def saved_direction(self):
        """The run's direction (direction.safetensors), checked against the run's model."""
        from ..core.directions import load_direction

        if not self.layout.direction.is_file():
            raise UserError(f"{self.out} has no direction yet; run `refusal-direction replicate --out {self.out}` "
                            "first")
        return load_direction(self.layout.direction, model_id=self.config.model)


def process_age_s() -> float | None:
    """Seconds since this process started (interpreter start-up and imports included) when the process is the
    command line tool (``refusal-direction`` or ``python -m refusal_direction``); None inside another program (a
    notebook, a test runner: its age says nothing about the run) or where /proc is missing."""
    import sys

    import __main__

    spec = getattr(__main__, "__spec__", None)
    if not ((spec is not None and spec.name.startswith("refusal_direction"))
            or Path(sys.argv[0]).name == "refusal-direction"):
        return None
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        return time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def prepare_run(out: str | Path, config: RunConfig, force: bool = False, progress: bool = False,
                loader=None) -> Run:
    """Lock, create or reopen ``out`` for ``config``; refuse a directory that is not ours or (without
    ``force``) belongs to another config. ``force`` on another config's run deletes only our files."""
    out = Path(out)
    check_out_dir(out, config, force)
    out.mkdir(parents=True, exist_ok=True)
    acquire_lock(out)
    cfg_path = RunLayout(out).config
    if cfg_path.is_file() and config_mismatch(out, config) is not None:
        clear_outputs(out)  # force: check_out_dir raised otherwise
    atomic_write_json(cfg_path, {"fingerprint": config.fingerprint(), "config": config.to_dict(),
                                 "refusal_direction_version": __version__})
    return Run(out, config, progress, loader)


def open_run(out: str | Path, overrides: dict | None = None, progress: bool = False, loader=None) -> Run:
    """Reopen an existing run directory with its saved config (``overrides`` for non-result fields)."""
    out = Path(out)
    if not RunLayout(out).config.is_file():
        raise UserError(f"{out} is not a run directory (no config.json); create one with "
                        "`refusal-direction replicate --out DIR`")
    saved = read_saved_config(out)["config"]
    config = build_config(overrides or {}, base=saved)
    acquire_lock(out)
    return Run(out, config, progress, loader)


def check_numerics(out: Path, device: str, dtype: str) -> None:
    """Refuse to resume a run on another device type or dtype than it began with (mixed numerics)."""
    env_path = RunLayout(out).environment
    if not env_path.is_file():
        return
    from ..core.model import resolve_device, resolve_dtype

    env = read_json(env_path, "run file")
    resolved = resolve_device(device)
    new_dtype = str(resolve_dtype(dtype, resolved)[0]).replace("torch.", "")
    old_device, old_dtype = str(env.get("device", "")), env.get("dtype")
    if old_device.split(":")[0] != resolved.split(":")[0] or (old_dtype and old_dtype != new_dtype):
        raise UserError(f"run directory {out} was begun on {old_device} in {old_dtype}; resuming on {resolved} in "
                        f"{new_dtype} would mix numerics in one summary. Resume with --device "
                        f"{old_device.split(':')[0]} --dtype {old_dtype}, or start a new run with another --out")


def log_to_run_dir(out: Path, logger: logging.Logger) -> logging.Handler:
    """Append ``logger``'s records to ``out``/run.log (``out`` is created); returns the handler added."""
    out.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(RunLayout(out).run_log)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logger.addHandler(handler)
    return handler


def write_environment(run: Run) -> None:
    lm = run._lm
    import transformers

    env = {
        "refusal_direction": __version__, "git_commit": _git_commit(), "python": platform.python_version(),
        "platform": platform.platform(), "torch": torch.__version__, "transformers": transformers.__version__,
        "device": str(lm.device), "placement": lm.placement or "one device",
        "dtype": str(lm.dtype).replace("torch.", ""), "dtype_reason": lm.dtype_reason,
        "cuda_device": torch.cuda.get_device_name(lm.device) if lm.device.type == "cuda" else None,
        "model": lm.model_id, "n_layers": lm.n_layers, "d_model": lm.d_model,
        "chat_format": {"prefix": lm.chat.prefix, "suffix": lm.chat.suffix, "source": lm.chat.source},
        "post_instruction_tokens": lm.post_instruction_tokens(),
    }
    path = run.layout.environment
    old = read_json(path, "run file") if path.is_file() else {}
    for key in ("generation_backend", "decode_step"):  # recorded by the generate stage; kept across model loads
        if key in old:
            env[key] = old[key]
    atomic_write_json(path, env)


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
