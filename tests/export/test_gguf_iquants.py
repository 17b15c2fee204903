"""gguf:iq4_nl / gguf:iq4_xs / gguf:iq3_s / gguf:iq3_xxs layers in a GGUF: their own block bytes under their GGML types, read back by
gguf-py, and general.file_type naming the type that holds most linear weights."""
import pytest
from gguf import GGMLQuantizationType, GGUFReader, LlamaFileType

import qbara
from qbara import QuantConfig
from qbara.export import export_gguf
from qbara.export.gguf import LINEARS
from qbara.export.gguf.metadata import file_type
from qbara.models import tiny_llama

from .conftest import snap_to_q8_0
from .test_gguf_mixed import WIDE, assert_layers_are_their_own_blocks

# IQ4_XS on gate / up (2 x 512x256 weights per layer), IQ3_XXS on q, IQ4_NL on k / v / o, IQ3_S on down
# (256x512); 2 layers.
MIX = {"self_attn.q_proj": "gguf:iq3_xxs", "self_attn.k_proj": "gguf:iq4_nl", "self_attn.v_proj": "gguf:iq4_nl",
       "self_attn.o_proj": "gguf:iq4_nl", "mlp.gate_proj": "gguf:iq4_xs", "mlp.up_proj": "gguf:iq4_xs",
       "mlp.down_proj": "gguf:iq3_s"}


@pytest.fixture(scope="module")
def iquant_file(tmp_path_factory):
    model, tokenizer = tiny_llama(seed=5, **WIDE)
    snap_to_q8_0(model)
    qbara.prepare(model, {f"model.layers.{i}.{sub}": QuantConfig(fmt) for i in range(WIDE["layers"])
                          for sub, fmt in MIX.items()})
    path = tmp_path_factory.mktemp("iquants") / "iquants.gguf"
    return model, path, export_gguf(model, tokenizer, path)


def test_iquant_layers_are_their_own_blocks_read_back_by_gguf_py(iquant_file):
    model, path, report = iquant_file
    types = assert_layers_are_their_own_blocks(model, path)
    want_type = {"gguf:iq4_nl": GGMLQuantizationType.IQ4_NL, "gguf:iq4_xs": GGMLQuantizationType.IQ4_XS,
                 "gguf:iq3_s": GGMLQuantizationType.IQ3_S, "gguf:iq3_xxs": GGMLQuantizationType.IQ3_XXS}
    for i in range(len(model.model.layers)):
        for sub, gguf_name in LINEARS:
            assert types[f"blk.{i}.{gguf_name}.weight"] == want_type[MIX[sub]]
    assert report.lossless and report.format_counts == {"IQ3_S": 2, "IQ3_XXS": 2, "IQ4_NL": 6, "IQ4_XS": 4}


def test_file_type_names_the_dominant_iquant(iquant_file):
    _, path, report = iquant_file
    reader = GGUFReader(str(path))
    assert reader.fields["general.file_type"].contents() == int(LlamaFileType.MOSTLY_IQ4_XS)
    params = sum(int(t.n_elements) for t in reader.tensors if t.tensor_type == GGMLQuantizationType.IQ4_XS)
    others = sum(int(t.n_elements) for t in reader.tensors if t.tensor_type == GGMLQuantizationType.IQ4_NL)
    assert params > others


@pytest.mark.parametrize("counts,name", [
    ({"IQ4_NL": 300, "Q4_0": 200, "Q6_K": 100}, "MOSTLY_IQ4_NL"),
    ({"IQ4_XS": 100, "Q4_0": 200}, "MOSTLY_Q4_0"),
    ({"Q4_K": 500, "Q6_K": 100}, "MOSTLY_Q4_K_M"),
    ({"IQ4_XS": 9, "Q8_0": 4, "Q5_0": 4, "Q4_0": 4}, "MOSTLY_IQ4_XS"),
    ({"IQ3_S": 300, "Q4_K": 100, "IQ4_NL": 200}, "MOSTLY_IQ3_S"),
    ({"IQ3_XXS": 300, "IQ3_S": 100}, "MOSTLY_IQ3_XXS"),
])
def test_file_type_is_the_type_with_most_linear_weights(counts, name):
    assert file_type(counts) == int(LlamaFileType[name])
