"""pytest-benchmark of forward+backward of the four AFA losses, for every available backend,
at a small and a medium shape.

    pytest bench/ --benchmark-only                # time them, grouped by loss and shape
    pytest bench/ -q --benchmark-disable          # run each case once: a smoke test

Each case also checks that the loss is finite and within LOSS_TOLERANCE of the reference
loss evaluated in float64, and that dL/d(target) is within GRAD_TOLERANCE of its gradient.
"""

import functools

import pytest
import torch

import cases
import timing

SHAPES = {"small": (4, 64, 14, 14), "medium": (16, 256, 28, 28)}
DTYPE = torch.float32
DEVICE = timing.resolve_device("auto")
BACKENDS = cases.backends_on(DEVICE, include_reference=True)
LOSS_TOLERANCE = 1e-4
GRAD_TOLERANCE = 1e-4


@functools.cache
def cached_inputs(loss_name: str, size: str) -> cases.LossInputs:
    return cases.make_inputs(loss_name, SHAPES[size], DTYPE, DEVICE)


@functools.cache
def cached_truth(loss_name: str, size: str) -> cases.Evaluation:
    return cases.float64_reference(cached_inputs(loss_name, size))


@pytest.mark.parametrize("size", list(SHAPES))
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_name", cases.LOSS_NAMES)
def test_forward_backward(benchmark, loss_name, backend, size):
    inputs = cached_inputs(loss_name, size)
    loss_fn = cases.loss_function(loss_name, backend)
    shape = SHAPES[size]
    benchmark.group = f"{loss_name} {cases.shape_text(shape)} {cases.dtype_name(DTYPE)} {DEVICE.type}"
    benchmark.extra_info.update(numel=cases.numel(shape), floor_bytes=5 * cases.numel(shape) * DTYPE.itemsize)

    loss = benchmark(cases.forward_backward, loss_fn, inputs)

    truth = cached_truth(loss_name, size)
    assert torch.isfinite(loss).item(), f"{backend} {loss_name}: loss is {loss.item()}"
    assert cases.relative_error(loss, truth.loss) <= LOSS_TOLERANCE
    assert cases.relative_error(inputs.target.grad, truth.target_grad) <= GRAD_TOLERANCE
