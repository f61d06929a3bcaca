"""64-bit indexing: features whose elements lie more than 2^31 elements apart.

The features are a few elements of a 4 GiB (virtual) storage, placed with as_strided at
both ends of it; untouched pages of the storage are never backed by memory, so the test
needs only a few KiB. A 32-bit element offset would wrap and read the wrong elements.
"""
import pytest
import torch

import afa_ext

pytestmark = pytest.mark.skipif("cpu" not in afa_ext.available_backends(), reason="afa_ext._C not built")

FAR = 2**31 + 5  # elements between the two channels: more than a 32-bit offset can hold
POSITIONS = 48


def far_apart_features(seed: int):
    """(1, 2, POSITIONS) bfloat16 features whose channel 1 starts FAR elements after channel 0."""
    try:
        storage = torch.empty(FAR + POSITIONS, dtype=torch.bfloat16)
    except RuntimeError as error:  # a machine that will not even reserve 4 GiB of addresses
        pytest.skip(f"cannot reserve 4 GiB of address space: {error}")
    generator = torch.Generator().manual_seed(seed)
    near = torch.randn(POSITIONS, generator=generator).bfloat16()
    far = (torch.randn(POSITIONS, generator=generator) + 3).bfloat16()
    storage[:POSITIONS] = near
    storage[FAR:] = far
    features = storage.as_strided((1, 2, POSITIONS), (0, FAR, 1))
    dense = torch.stack([near, far]).unsqueeze(0)
    return features, dense


def check_ops_read_beyond_2_31(ops, backward_rtol=0.0):
    """The forward ops and the channel backward of an op library (torch.ops.<namespace>)
    on features whose channels lie FAR elements apart, against a dense copy."""
    target, dense_target = far_apart_features(0)
    source, dense_source = far_apart_features(1)
    diff = dense_target.double() - dense_source.double()
    torch.testing.assert_close(ops.channel_sqdist(target, source).double(), (diff**2).sum(2), rtol=1e-5, atol=0)
    torch.testing.assert_close(ops.spatial_sqdist(target, source).double(), (diff**2).sum(1), rtol=1e-5, atol=0)
    grad = torch.tensor([[0.5, 2.0]])
    dt = ops.channel_sqdist_backward(grad, target, source)
    expected = (2 * grad[:, :, None].double() * diff).bfloat16().double()
    torch.testing.assert_close(dt.double(), expected, rtol=backward_rtol, atol=0)


def test_cpu_kernels_read_elements_beyond_2_31():
    check_ops_read_beyond_2_31(torch.ops.afa_ext)
