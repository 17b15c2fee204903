import pytest
import torch
from torch import nn

from qbara.nn import QuantizedLinear
from qbara.quant import QuantConfig
from qbara.quant.tensor import quantize

CONFIGS = [QuantConfig("nf4"), QuantConfig("nf3", 32), QuantConfig("int4", 32), QuantConfig("int2", 64),
           QuantConfig("int4", 32, block_rows=4)]


def _layer(config, bias=True, seed=0):
    torch.manual_seed(seed)
    dense = nn.Linear(128, 64, bias=bias)
    return dense, QuantizedLinear.from_linear(dense, config)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.label)
def test_forward_and_input_grad_match_dense_reference(config):
    dense, q = _layer(config)
    w = q.dequantize()
    x = torch.randn(2, 5, 128, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y = q(x)
    y_ref = torch.nn.functional.linear(x_ref, w, dense.bias)
    assert torch.allclose(y, y_ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-5, rtol=1e-5)


def test_weight_is_frozen_and_no_dense_copy_is_saved_for_backward():
    _, q = _layer(QuantConfig("nf4"))
    assert [p for p in q.parameters() if p.requires_grad] == []
    saved_shapes = []

    def pack(t):
        saved_shapes.append(tuple(t.shape))
        return t

    x = torch.randn(4, 128, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        q(x).sum().backward()
    assert (64, 128) not in saved_shapes and (128, 64) not in saved_shapes
    assert x.grad is not None


def test_buffers_travel_in_state_dict_and_are_packed():
    _, q = _layer(QuantConfig("nf4"), bias=False)
    state = q.state_dict()
    assert state["codes"].dtype == torch.uint8 and state["codes"].numel() == 64 * 128 // 2
    assert q.bits_per_param == pytest.approx(8 * sum(t.numel() * t.element_size() for t in state.values()) / (64 * 128))
    fresh = QuantizedLinear(q.qweight, None)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.dequantize(), q.dequantize())


def test_bf16_input_runs_in_bf16():
    _, q = _layer(QuantConfig("int4", 32))
    y = q(torch.randn(3, 128, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.label)
def test_cuda_matches_cpu(config):
    _, q = _layer(config)
    x = torch.randn(4, 128)
    y_cpu = q(x)
    q_cuda = q.to("cuda")
    x_cuda = x.cuda().requires_grad_(True)
    y_cuda = q_cuda(x_cuda)
    y_cuda.sum().backward()
    assert torch.allclose(y_cuda.cpu(), y_cpu, atol=1e-4, rtol=1e-4)
    assert x_cuda.grad is not None


def test_gradient_checkpointing_gives_the_same_adapter_gradients():
    """Quantized layers under activation checkpointing: recomputed forward, same gradients as without."""
    from qbara import AdapterConfig, QuantConfig, prepare
    from qbara.models import tiny_llama
    from tests.helpers import randomize_adapters

    ids = torch.randint(0, 250, (2, 24), generator=torch.Generator().manual_seed(0))
    grads = []
    for checkpointing in (False, True):
        model, _ = tiny_llama(seed=0, layers=3)
        prepare(model, QuantConfig("int4", 32), AdapterConfig("qahira", rank=4))
        randomize_adapters(model, seed=3)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 21
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-7), name
        assert grads[0][name].abs().sum() > 0, name


@pytest.mark.parametrize("config", [QuantConfig("nf4"), QuantConfig("nf2", 32), QuantConfig("nf8", 64),
                                    QuantConfig("nf3", 64), QuantConfig("int4", 32), QuantConfig("int2", 16),
                                    QuantConfig("int8", 32, minimum_dtype="fp32"), QuantConfig("int3", 32),
                                    QuantConfig("int4", 4, block_rows=8)], ids=lambda c: c.label)
def test_matmul_weight_rebuilt_in_the_reused_buffer_equals_dequantize(config):
    """The forward/backward's in-place rebuild (or its fallback) is the dequantized weight, bit for bit."""
    from qbara.nn.quantized_linear import _weight_for_matmul

    weight = torch.randn(48, 128, generator=torch.Generator().manual_seed(1)) * 0.05
    layer = QuantizedLinear(quantize(weight, config))
    expected = layer.dequantize(torch.float32)
    assert torch.equal(_weight_for_matmul(layer, torch.float32), expected)
    into = layer.qweight.dequantize_into(torch.empty(weight.numel()))
    assert into is None if config.bits == 3 or config.block_rows > 1 else torch.equal(into, expected)


def test_threads_rebuild_their_own_weights():
    """The reused buffer is per thread: layers of different shapes run concurrently give their own results."""
    import threading

    layers = [QuantizedLinear(quantize(torch.randn(64 * (i + 1), 128) * 0.05, QuantConfig("nf4"))) for i in range(2)]
    x = torch.randn(4, 128)
    expected = [x @ layer.dequantize().t() for layer in layers]
    errors = []

    def run(i):
        for _ in range(30):
            if not torch.equal(layers[i](x), expected[i]):
                errors.append(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
