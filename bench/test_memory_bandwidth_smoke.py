"""bench/memory_bandwidth.py end to end on a small N: its kernels build and run, and it
reports every kind of traffic and the floor a fused fwd+bwd can reach."""

from __future__ import annotations

import re

import pytest

import memory_bandwidth

pytestmark = pytest.mark.skipif(not memory_bandwidth.has_avx2(), reason="needs an x86-64 CPU with AVX2")


def test_memory_bandwidth_small_run(capsys):
    assert memory_bandwidth.main(["--batch", "1", "--rounds", "2"]) == 0
    out = capsys.readouterr().out
    for name in (
        "read pair",
        "stream difference",
        "plain copy",
        "streaming copy",
        "torch copy_ (5N floor)",
        "cpu backend: fwd+bwd",
    ):
        assert f"| {name} |" in out, name
    ratio = re.search(r"= ([0-9.]+)x the 5N floor", out)
    assert ratio is not None and 0 < float(ratio.group(1)) < 10


def test_the_kernels_compute_what_they_are_counted_as():
    import torch

    kernels = memory_bandwidth.build_kernels()
    a, b = torch.rand(1000), torch.rand(1000)
    c = torch.empty(1000)
    assert kernels.read_pair(a, b) == pytest.approx(float(((a.double() - b.double()) ** 2).sum()), rel=1e-5)
    kernels.stream_difference(c, a, b)
    torch.testing.assert_close(c, 2 * (a - b))
    for streaming in (False, True):
        c.zero_()
        kernels.copy(c, a, streaming)
        assert torch.equal(c, a)
