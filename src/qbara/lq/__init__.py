"""LQ-LoRA, the algorithms over matrices: low-rank plus quantized decomposition, candidate configs, error tables,
ILP bit allocation, the diagonal Fisher information for the data-aware variant, and the importance matrix that
weights gguf:* rounding. From Guo, Greengard, Xing, Kim, "LQ-LoRA: Low-rank Plus Quantized Matrix Decomposition for
Efficient Language Model Finetuning" (arXiv 2311.12023). A model (or a checkpoint folder) is initialised through
`qbara.prepare(model, LQConfig(...), AdapterConfig(...))`, whose pipeline is `qbara.models.lq`."""
from qbara.lq.config import LQConfig
from qbara.lq.configs import candidate_configs, config_bits, gguf_configs, pareto_front, qlora_config
from qbara.lq.decompose import Decomposition, decompose, randomized_svd
from qbara.lq.filesize import FileBudget
from qbara.lq.fisher import calibration_sequences, fisher_information, load_fisher, save_fisher
from qbara.lq.ilp import allocate, budget_range
from qbara.lq.imatrix import importance_matrix, load_importance, save_importance
from qbara.lq.layers import LQReport, decompose_layers
from qbara.lq.loftq import loftq
from qbara.lq.tables import ErrorTable, error_table, matrix_costs

__all__ = [
    "Decomposition", "decompose", "randomized_svd", "candidate_configs", "config_bits", "pareto_front",
    "qlora_config", "allocate", "budget_range", "ErrorTable", "error_table", "matrix_costs", "fisher_information",
    "calibration_sequences", "save_fisher", "load_fisher", "loftq", "LQReport", "decompose_layers", "gguf_configs",
    "FileBudget", "LQConfig", "importance_matrix", "save_importance", "load_importance",
]
