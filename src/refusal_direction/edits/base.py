"""The `Edit` protocol and the registry of methods.

An edit is one change of the residual stream with all its forms, owned by its class in one file of
`edits.methods` (registered by name with ``@register``):

- hooks, with an optional per-row switch: ``hooks(lm, rows) -> handles``, for every generation and measure
  (`core.hooks.apply_intervention`);
- stacked rows, one hook per site for many edits in one batch: ``projection(lm)`` or ``stack(lm, group, switches)``
  (`edits.stacked`);
- rows of the own decode step: ``row_form(lm) -> RowForm`` (`accel.own_step`);
- the weight edit: ``weights_(model) -> EditedWeights`` (`export`; the LoRA factors of `export.lora` are taken from
  what it changed);
- a description for provenance and tables: ``describe() -> dict``;
- construction from a run's artifacts: ``from_run(inputs, name)`` (`compare`, `export --method`, `verify-export`);
- search parameters: ``suggest(trial, n_layers)`` and ``from_params(inputs, direction, params, name)`` (`optimize`).

A form an edit does not have is stated with its reason in ``reasons`` (``{"weights": why, "lora": why, ...}``);
`tests/unit/test_architecture.py` checks that every registered edit has each form or a reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping, NamedTuple, Protocol

import torch

from ..core.directions import CandidateDirections, Direction
from ..core.hooks import apply_intervention
from ..core.model import LoadedModel
from ..errors import UserError

# The forms an edit can have (see the module docstring); a missing one needs a reason in ``Edit.reasons``.
FORMS = ("hooks", "stacked", "own_step", "weights", "lora", "from_run", "search")


class NoWeightForm(UserError):
    """The edit has no weight form (its reason says why); use its hooks."""


class RowForm(NamedTuple):
    """An edit as the own decode step runs it: a unit direction ablated at every site, or a vector added at one
    block's input (either may be None: the baseline has neither)."""

    ablate: torch.Tensor | None = None  # [d_model] unit direction, in the model's dtype and device
    add: torch.Tensor | None = None  # [d_model] vector added at block ``layer``'s input
    layer: int = -1


class Store(Protocol):
    """Where a method keeps what it computed from a run (e.g. COSMIC's scores), by key; `run` maps keys to files."""

    def read(self, key: str) -> dict | None: ...

    def write(self, key: str, data: dict) -> None: ...


@dataclass
class EditInputs:
    """What a method is built from: a model and its difference-in-means candidates, and from a run also its
    selected direction, its means and its validation prompts (`run.compare_methods.edit_inputs`).

    ``means`` is called on first use (harmful, harmless means [n_pos, n_layers, d]); it raises a UserError naming
    the fix when the run has none (a run made from a direction file). The search needs only ``lm`` and
    ``candidates``."""

    lm: LoadedModel
    candidates: CandidateDirections
    direction: Direction | None = None
    means: Callable[[], tuple[CandidateDirections, CandidateDirections]] | None = None
    harmful_val: list[str] = field(default_factory=list)
    harmless_val: list[str] = field(default_factory=list)
    prune_layer_fraction: float = 0.2
    batch_size: int = 32
    actadd_coeff: float = 1.0
    store: Store | None = None
    _means: tuple | None = field(default=None, repr=False)

    def mean_harmful(self) -> CandidateDirections:
        return self._loaded_means()[0]

    def mean_harmless(self) -> CandidateDirections:
        return self._loaded_means()[1]

    def _loaded_means(self) -> tuple[CandidateDirections, CandidateDirections]:
        if self._means is None:
            if self.means is None:
                raise UserError("this method needs the run's mean activations (directions/mean_*.safetensors)")
            self._means = self.means()
        return self._means


class Edit:
    """Base of every edit (module docstring). Subclasses are frozen dataclasses with a ``name`` field (the
    condition's name in artifact file names) and override the forms they have."""

    method: ClassVar[str] = ""  # the registry name (set by `register`)
    order: ClassVar[int] = 100  # position among the methods in tables (`compare` rows)
    compare: ClassVar[bool] = False  # a row of `compare`: an edit that removes refusal
    searchable: ClassVar[bool] = False  # a form of `optimize`'s search
    identity: ClassVar[bool] = False  # changes nothing (the baseline): measures against the baseline are 0
    reasons: ClassVar[Mapping[str, str]] = {}  # form -> why this edit does not have it
    name: str

    def describe(self) -> dict:
        """The edit's parameters for provenance and tables (each method adds its own)."""
        return {"type": self.method}

    def hooks(self, lm: LoadedModel, rows: torch.Tensor | None = None) -> list:
        """Register the edit's hooks on ``lm.model`` (``rows`` [batch]: 1 where the edit applies); the handles."""
        raise UserError(f"{self.name!r} ({self.method}) has no hooks of its own: {self.reasons.get('hooks', '')}")

    def projection(self, lm: LoadedModel) -> tuple[torch.Tensor, dict] | None:
        """(basis [k, d] float32, {(site, layer): weight}) for a projection y ← y − w Σ (y·q) q, else None."""
        return None

    @classmethod
    def stack(cls, lm: LoadedModel, group: list, switches: list) -> list | None:
        """One hook per module for several edits of this class, each on its own rows; None: hook them singly."""
        return None

    def row_form(self, lm: LoadedModel) -> RowForm | None:
        """The edit for the own decode step, or None (HF's step runs it, with ``reasons["own_step"]``)."""
        return None

    def weights_(self, model) -> Any:
        """The weight form, applied to ``model`` in place (`edits.weights.EditedWeights`)."""
        raise NoWeightForm(f"{self.name!r} ({self.method}) has no weight form: {self.reasons.get('weights', '')}; "
                           "use its hooks")

    @classmethod
    def from_run(cls, inputs: EditInputs, name: str) -> Edit:
        raise UserError(f"method {cls.method!r} is not built from a run: {cls.reasons.get('from_run', '')}")

    @classmethod
    def suggest(cls, trial, n_layers: int) -> None:
        """Sample this method's own search parameters on ``trial`` (an `optuna.Trial`)."""

    @classmethod
    def from_params(cls, inputs: EditInputs, direction: Direction, params: dict, name: str) -> Edit:
        raise UserError(f"method {cls.method!r} is not part of the search: {cls.reasons.get('search', '')}")


_REGISTRY: dict[str, type[Edit]] = {}


def register(name: str):
    """Class decorator: register an `Edit` subclass as method ``name``."""

    def deco(cls: type[Edit]) -> type[Edit]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"method {name!r} is registered twice ({_REGISTRY[name].__name__}, {cls.__name__})")
        cls.method = name
        _REGISTRY[name] = cls
        return cls

    return deco


def registry() -> dict[str, type[Edit]]:
    """Every registered method by name, in table order (``order``, then name)."""
    from . import methods  # noqa: F401  (importing the package registers every method file)

    return dict(sorted(_REGISTRY.items(), key=lambda kv: (kv[1].order, kv[0])))


def get_method(name: str) -> type[Edit]:
    known = registry()
    if name not in known:
        raise UserError(f"unknown method {name!r}; choose one of {', '.join(known)}")
    return known[name]


def has_form(cls: type[Edit], form: str) -> bool:
    """Whether ``cls`` implements ``form`` itself (not only the base class's refusal)."""
    own = {"hooks": ("hooks",), "stacked": ("projection", "stack"), "own_step": ("row_form",),
           "weights": ("weights_",), "lora": ("weights_",), "from_run": ("from_run",),
           "search": ("from_params",)}[form]
    defined = {m for c in cls.__mro__ if c is not Edit and issubclass(c, Edit) for m in vars(c)}
    return bool(defined & set(own)) and not (form == "lora" and "lora" in cls.reasons)


__all__ = ["FORMS", "Edit", "EditInputs", "NoWeightForm", "RowForm", "Store", "apply_intervention", "get_method",
           "has_form", "register", "registry"]
