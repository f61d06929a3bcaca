"""The CPU backward's cache of large gradient blocks: reuse gives right values, and
afa_ext.empty_cache() hands the blocks back."""

import pytest
import torch

import afa_ext

pytestmark = pytest.mark.skipif("cpu" not in afa_ext.available_backends(), reason="afa_ext._C not built")

# 2 * 64 * 256 * 260 float32 elements: 34 MB, above 32 MiB, where glibc always maps afresh.
LARGE_SHAPE = (2, 64, 256, 260)
# 13 MB: the size of ResNet-101's last hooked layer's gradient at batch 32, which glibc
# may map afresh at every step too; blocks above 4 MiB are cached.
MIDDLE_SHAPE = (2, 64, 112, 224)


def expected_gradient(grad, target, source):
    return (2.0 * grad.double()[:, :, None, None] * (target.double() - source.double())).float()


@pytest.mark.parametrize("shape", [LARGE_SHAPE, MIDDLE_SHAPE], ids=["34MB", "13MB"])
def test_reused_gradient_blocks_hold_the_new_values(shape):
    afa_ext.empty_cache()
    generator = torch.Generator().manual_seed(3)
    target = torch.randn(shape, generator=generator)
    source = torch.randn(shape, generator=generator)
    for step in range(3):
        grad = torch.rand(shape[:2], generator=generator) + step
        dt = torch.ops.afa_ext.channel_sqdist_backward(grad, target, source)
        torch.testing.assert_close(dt, expected_gradient(grad, target, source), rtol=1e-6, atol=1e-6)
        del dt  # back into the cache for the next step
    assert afa_ext.empty_cache() >= target.numel() * target.element_size()
    assert afa_ext.empty_cache() == 0


def test_cached_gradient_survives_as_a_leaf_grad():
    target = torch.randn(LARGE_SHAPE, requires_grad=True)
    source = torch.randn(LARGE_SHAPE)
    afa_ext.functional.feature_map_loss(target, source, backend="cpu").backward()
    kept = target.grad.clone()
    afa_ext.empty_cache()  # frees only dead blocks, never the live target.grad
    torch.testing.assert_close(target.grad, kept, rtol=0, atol=0)
    torch.testing.assert_close(target.grad, target.detach() - source, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "transposed", "sliced"])
def test_a_large_gradient_is_laid_out_as_empty_like_the_target(layout):
    """Above 4 MiB the gradient of a dense target comes from the cached blocks with the
    target's own strides; a sliced one from torch's allocator. Either way it is laid out
    as torch.empty_like(target) (the layout the fake kernel promises)."""
    afa_ext.empty_cache()
    generator = torch.Generator().manual_seed(5)
    base = torch.randn(MIDDLE_SHAPE[0], MIDDLE_SHAPE[1], MIDDLE_SHAPE[2], MIDDLE_SHAPE[3] + 8, generator=generator)
    target = {
        "contiguous": base[..., :-8].contiguous(),
        "channels_last": base[..., :-8].contiguous(memory_format=torch.channels_last),
        "transposed": base[..., :-8].transpose(2, 3).contiguous().transpose(2, 3),
        "sliced": base[..., :-8],
    }[layout]
    source = torch.randn(target.shape, generator=generator)
    grad = torch.rand(target.shape[:2], generator=generator)
    dt = torch.ops.afa_ext.channel_sqdist_backward(grad, target, source)
    assert dt.stride() == torch.empty_like(target).stride()
    torch.testing.assert_close(dt, expected_gradient(grad, target, source), rtol=1e-6, atol=1e-6)
    del dt  # a cached block goes back to the cache
    freed = afa_ext.empty_cache()
    if layout == "sliced":
        assert freed == 0
    else:
        assert freed >= target.numel() * target.element_size()
