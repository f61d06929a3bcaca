"""The CPU backward writes gradients of 2 MiB and more with streaming (non-temporal)
stores when every row of the inner dim fills whole cache lines, and with plain stores
otherwise. Both paths must give the float64 model's gradient, and the same bits: the
gradient of each batch entry depends on that entry alone, so the gradient of the whole
batch (streamed) must equal, bit for bit, the gradients of the entries computed one at a
time (each below 2 MiB: plain stores)."""

import pytest
import torch

import afa_ext
from float64_model import partial_sums_backward
from loss_cases import make_features
from op_checks import grad_for

pytestmark = pytest.mark.skipif("cpu" not in afa_ext.available_backends(), reason="afa_ext._C not built")

ops = torch.ops.afa_ext

# 8 entries of 2^17 elements: a 4 MiB float32 gradient (2 MiB in bfloat16, still streamed
# where its rows allow).
SHAPES = {
    "rows_fill_lines": (8, 64, 32, 64),  # rows of 2048 elements: streamed
    "rows_of_49": (8, 2688, 7, 7),  # 7x7 maps: rows end mid-line, plain stores
    "rows_of_196": (8, 672, 14, 14),  # 784-byte rows, 16 bytes past a line: plain stores
}
DTYPES = {torch.float32: (1e-6, 1e-6), torch.bfloat16: (1.6e-2, 1e-2), torch.float64: (1e-12, 1e-12)}


def features(shape, dtype, seed, layout="contiguous"):
    generator = torch.Generator().manual_seed(seed)
    target, source = make_features(shape, dtype, layout, layout, generator)
    return target.detach(), source.detach()


def upstream(grouping, target, seed):
    return grad_for(grouping, target, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("dtype", list(DTYPES), ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("layout", list(SHAPES))
@pytest.mark.parametrize("grouping", ["channel", "spatial"])
def test_a_large_gradient_matches_the_model_and_its_entries_bit_for_bit(grouping, layout, dtype):
    shape = SHAPES[layout]
    target, source = features(shape, dtype, seed=1)
    grad = upstream(grouping, target, seed=2)
    backward = getattr(ops, f"{grouping}_sqdist_backward")

    whole = backward(grad, target, source)
    assert whole.numel() * whole.element_size() >= 2 << 20

    rtol, atol = DTYPES[dtype]
    expected = partial_sums_backward(grouping, grad, target, source)
    torch.testing.assert_close(whole.double(), expected, rtol=rtol, atol=atol)
    entries = torch.cat([backward(grad[n : n + 1], target[n : n + 1], source[n : n + 1]) for n in range(shape[0])])
    assert torch.equal(whole, entries)


@pytest.mark.parametrize("grouping", ["channel", "spatial"])
def test_a_large_channels_last_gradient_matches_the_model(grouping):
    target, source = features((8, 64, 32, 64), torch.float32, seed=3, layout="channels_last")
    grad = upstream(grouping, target, seed=4)
    whole = getattr(ops, f"{grouping}_sqdist_backward")(grad, target, source)
    torch.testing.assert_close(
        whole.double(), partial_sums_backward(grouping, grad, target, source), rtol=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("grouping", ["channel", "spatial"])
def test_the_four_layer_backward_streams_the_layers_that_allow_it(grouping):
    shapes = [(4, 64, 56, 56), (4, 128, 28, 28), (4, 256, 14, 14), (4, 512, 7, 7)]
    pairs = [features(shape, torch.float32, seed=10 + k) for k, shape in enumerate(shapes)]
    targets, sources = [t for t, _ in pairs], [s for _, s in pairs]
    grads = [upstream(grouping, t, seed=20 + k) for k, t in enumerate(targets)]
    results = getattr(ops, f"grouped_{grouping}_sqdist_backward")(grads, targets, sources)
    for grad, target, source, result in zip(grads, targets, sources, results):
        torch.testing.assert_close(
            result.double(), partial_sums_backward(grouping, grad, target, source), rtol=1e-6, atol=1e-6
        )
        single = getattr(ops, f"{grouping}_sqdist_backward")(grad, target, source)
        assert torch.equal(result, single)
