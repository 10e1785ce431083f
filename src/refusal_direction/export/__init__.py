"""Export stage: save a model with an edit's weight form baked in (`save.export_edit`, any method; `export_model`,
the DiM direction), the provenance and README around it (`card`), and check that the saved model matches the hooks
(`verify`); `stream` does the DiM edit shard by shard on the files, for models bigger than memory; `lora` writes the
low-rank edits as a peft adapter. The weight forms themselves are the edits' own (`edits`)."""

from .card import EXPORT_INFO, direction_digest
from .save import export_edit, export_model, load_exported, read_export_info
from .stream import export_streaming, residual_roles
from .verify import check_same_direction, default_tol, verify_export, verify_method_export

__all__ = ["EXPORT_INFO", "check_same_direction", "default_tol", "direction_digest", "export_edit", "export_model",
           "export_streaming", "load_exported", "read_export_info", "residual_roles", "verify_export",
           "verify_method_export"]
