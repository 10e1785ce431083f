"""Export stage: bake directional ablation into the weights (`orthogonalize`), save the model (`save`), and
check that the saved model matches the hooks (`verify`); `stream` does the edit shard by shard on the files, for
models bigger than memory."""

from .card import EXPORT_INFO, direction_digest
from .orthogonalize import EditedWeights, check_dense, find_residual_writers, orthogonalize_weights_, untie_embeddings_
from .save import export_model, load_exported, read_export_info
from .stream import export_streaming, residual_roles
from .verify import check_same_direction, default_tol, verify_export

__all__ = ["EditedWeights", "orthogonalize_weights_", "check_dense", "untie_embeddings_", "find_residual_writers",
           "export_model", "direction_digest", "read_export_info", "load_exported", "verify_export", "EXPORT_INFO",
           "check_same_direction", "default_tol", "export_streaming", "residual_roles"]
