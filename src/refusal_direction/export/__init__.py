"""Export stage: bake directional ablation into the weights (`orthogonalize`), save the model (`save`), and
check that the saved model matches the hooks (`verify`)."""

from .orthogonalize import EditedWeights, check_dense, find_residual_writers, orthogonalize_weights_, untie_embeddings_
from .save import EXPORT_INFO, direction_digest, export_model, load_exported, read_export_info
from .verify import check_same_direction, default_tol, verify_export

__all__ = ["EditedWeights", "orthogonalize_weights_", "check_dense", "untie_embeddings_", "find_residual_writers",
           "export_model", "direction_digest", "read_export_info", "load_exported", "verify_export", "EXPORT_INFO",
           "check_same_direction", "default_tol"]
