"""`ExportReport`: what a base GGUF export wrote, and how faithful it is."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


def _counts(types) -> dict[str, int]:
    counts: dict[str, int] = {}
    for kind in types:
        counts[kind] = counts.get(kind, 0) + 1
    return dict(sorted(counts.items()))


@dataclass
class ExportReport:
    """What `export_gguf` wrote, and how faithful it is. exact_q4_1 / exact_q5_1 / exact_ggml: linears written
    bit-exact from their own INT4 G32 / INT5 G32 / gguf:* codes; requantized: linears re-quantized (lossy=True);
    *_error: relative Frobenius error ||W - Q(W)|| / ||W|| (requantized together, worst layer, embedding, dense);
    bits_per_param: 8 * data bytes / weights; dense: linears written unquantized (dense_type)."""

    path: Path
    size_bytes: int
    tensor_types: dict[str, str]
    exact_q4_1: list[str] = field(default_factory=list)
    requantized: list[str] = field(default_factory=list)
    requantize_error: float = 0.0
    max_layer_error: float = 0.0
    embedding_type: str = "q8_0"
    embedding_error: float = 0.0
    adapters_merged: int = 0
    tokenizer_source: str = ""
    provenance: dict[str, object] = field(default_factory=dict)
    seconds: float = 0.0
    exact_ggml: list[str] = field(default_factory=list)
    linear_types: dict[str, str] = field(default_factory=dict)
    bits_per_param: float = 0.0
    linear_bits_per_param: float = 0.0
    adapters_separate: int = 0
    exact_q5_1: list[str] = field(default_factory=list)
    architecture: str = "llama"
    dense: list[str] = field(default_factory=list)
    dense_error: float = 0.0

    @property
    def lossless(self) -> bool:
        """True when every linear layer was written from its own codes (no re-quantization)."""
        return not self.requantized

    @property
    def format_counts(self) -> dict[str, int]:
        """Linear layers per GGML type, e.g. {"Q4_1": 10, "Q4_K": 4}."""
        return _counts(self.linear_types.values())

    def _linear_line(self) -> str:
        if self.dense:
            return (f"{len(self.dense)} linear layers written unquantized (relative error {self.dense_error:.3e}); "
                    f"{len(self.exact_q4_1) + len(self.exact_q5_1) + len(self.exact_ggml)} from their own codes")
        if self.requantized:
            return (f"LOSSY: re-quantized {len(self.requantized)} linear layers, relative weight error "
                    f"{self.requantize_error:.3e} (worst layer {self.max_layer_error:.3e})")
        if not self.exact_ggml and not self.exact_q5_1:
            return f"lossless: {len(self.exact_q4_1)} linear layers packed from their INT4 G32 codes"
        parts = [(self.exact_q4_1, "INT4 G32 packed as Q4_1"), (self.exact_q5_1, "INT5 G32 packed as Q5_1"),
                 (self.exact_ggml, "gguf:* blocks")]
        total = sum(len(names) for names, _ in parts)
        kinds = ", ".join(f"{len(names)} {what}" for names, what in parts if names)
        return f"lossless: {total} linear layers written from their own codes ({kinds})"

    def summary(self) -> str:
        kinds = ", ".join(f"{n} {k}" for k, n in _counts(self.tensor_types.values()).items())
        lines = [(f"wrote {self.path} ({self.size_bytes / 1e6:.1f} MB, {len(self.tensor_types)} tensors: "
                  f"{kinds}) in {self.seconds:.1f} s")]
        if self.adapters_merged:
            lines.append(f"merged {self.adapters_merged} adapter layers")
        if self.adapters_separate:
            lines.append(f"left {self.adapters_separate} plain LoRA adapter layers out of the base, for the "
                         f"adapter GGUF")
        lines.append(self._linear_line())
        formats = ", ".join(f"{n} {k}" for k, n in self.format_counts.items())
        lines.append(f"linear layers by type: {formats}; {self.linear_bits_per_param:.3f} bits/param over the "
                     f"linear layers, {self.bits_per_param:.3f} over all tensors")
        lines.append(f"token embedding {self.embedding_type}, relative error {self.embedding_error:.3e}; "
                     f"tokenizer {self.tokenizer_source}")
        if "general.description" in self.provenance:
            license_ = self.provenance.get("general.license")
            lines.append(f"provenance: {self.provenance['general.description']}" +
                         (f"; license {license_}" if license_ else ""))
        return "\n".join(lines)
