"""LQ-LoRA over matrices: decomposition, candidate configs, error tables, ILP allocation, Fisher and importance
weights. Guo et al., "LQ-LoRA: Low-rank Plus Quantized Matrix Decomposition for Efficient Language Model
Finetuning" (arXiv 2311.12023). The model-level pipeline is `qbara.models.lq`."""
from qbara.lq.config import LQConfig
from qbara.lq.configs import candidate_configs, gguf_configs
from qbara.lq.decompose import decompose
from qbara.lq.filesize import FileBudget
from qbara.lq.fisher import save_fisher
from qbara.lq.imatrix import importance_matrix, load_importance, save_importance
from qbara.lq.loftq import loftq
from qbara.lq.tables import error_table, matrix_costs

__all__ = [
    "FileBudget", "LQConfig", "candidate_configs", "decompose", "error_table", "gguf_configs", "importance_matrix",
    "load_importance", "loftq", "matrix_costs", "save_fisher", "save_importance",
]
