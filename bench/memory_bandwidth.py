"""What the CPU's memory can do for a fused fwd+bwd of the squared-distance loss.

The 5N floor of the loss benchmarks is ``torch.Tensor.copy_`` moving 5N elements. A loss
pass does not move memory the way a copy does: the forward only reads (t and s, 2N), and
the backward reads 2N and writes N, which the CPU backend streams past the caches. This
times, side by side in interleaved rounds, on N elements per array (default: the four
hooked ResNet-101 layers at batch 32), small OpenMP kernels compiled here that do just
that traffic and no arithmetic worth the name:

  - read pair:          sum (a - b)^2 over two arrays (the forward's traffic, 2N read)
  - stream difference:  c = 2 (a - b), c written with streaming stores (the backward's: 2N
                        read, N written, no read for ownership)
  - plain copy / streaming copy: c = a, with ordinary or streaming stores
  - torch copy_:        the 5N floor's copy, counted as its read + write (2.5N each)

and, in the same rounds, the ``cpu`` backend's own ops on the same layers (the four-layer
spatial forward, backward, and both: what the AST loss runs), then reports each in GB/s
of the traffic it is counted as, and the fwd+bwd time these bandwidths allow (read pair +
stream difference) as a multiple of the 5N floor. That
multiple is the lowest "x 5N floor" a loss of this design can reach on this machine: an
ordinary store first reads the line it writes, so torch's copy moves 7.5N elements for the
5N it is counted as, and a loss that streams its gradient can beat the "floor".

Needs an x86-64 CPU with AVX2 and a C++ compiler (the kernels are built at first use with
torch.utils.cpp_extension, about a minute).

    python bench/memory_bandwidth.py                  # N of ResNet-101's hooked layers at batch 32
    python bench/memory_bandwidth.py --batch 64 --rounds 30
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
from pathlib import Path
from collections.abc import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import cases  # noqa: E402  (first: it puts the repository on sys.path when needed)
import afa_ext  # noqa: E402
import multilayer  # noqa: E402
import tables  # noqa: E402
import timing  # noqa: E402

KERNELS = r"""
#include <torch/extension.h>
#include <immintrin.h>
#include <omp.h>

// This thread's share [lo, hi) of n elements, cut on 64-element boundaries.
static void share(int64_t n, int64_t* lo, int64_t* hi) {
  const int threads = omp_get_num_threads(), id = omp_get_thread_num();
  const int64_t chunk = (n / threads) & ~int64_t(63);
  *lo = id * chunk;
  *hi = id == threads - 1 ? n : *lo + chunk;
}

double read_pair(torch::Tensor a, torch::Tensor b) {
  const float* x = a.data_ptr<float>();
  const float* y = b.data_ptr<float>();
  const int64_t n = a.numel();
  double total = 0;
#pragma omp parallel reduction(+ : total)
  {
    int64_t lo, hi;
    share(n, &lo, &hi);
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int64_t i = lo;
    for (; i + 16 <= hi; i += 16) {
      const __m256 d0 = _mm256_sub_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i));
      const __m256 d1 = _mm256_sub_ps(_mm256_loadu_ps(x + i + 8), _mm256_loadu_ps(y + i + 8));
      acc0 = _mm256_fmadd_ps(d0, d0, acc0);
      acc1 = _mm256_fmadd_ps(d1, d1, acc1);
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, _mm256_add_ps(acc0, acc1));
    for (float lane : lanes) total += lane;
    for (; i < hi; ++i) total += double(x[i] - y[i]) * double(x[i] - y[i]);
  }
  return total;
}

// c = 2 (a - b) with streaming stores; c must be 32-byte aligned.
void stream_difference(torch::Tensor c, torch::Tensor a, torch::Tensor b) {
  float* z = c.data_ptr<float>();
  const float* x = a.data_ptr<float>();
  const float* y = b.data_ptr<float>();
  const int64_t n = a.numel();
  const __m256 two = _mm256_set1_ps(2.0f);
#pragma omp parallel
  {
    int64_t lo, hi;
    share(n, &lo, &hi);
    int64_t i = lo;
    for (; i + 8 <= hi; i += 8) {
      _mm256_stream_ps(z + i, _mm256_mul_ps(two, _mm256_sub_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i))));
    }
    for (; i < hi; ++i) z[i] = 2.0f * (x[i] - y[i]);
    _mm_sfence();
  }
}

void copy(torch::Tensor c, torch::Tensor a, bool streaming) {
  float* z = c.data_ptr<float>();
  const float* x = a.data_ptr<float>();
  const int64_t n = a.numel();
#pragma omp parallel
  {
    int64_t lo, hi;
    share(n, &lo, &hi);
    int64_t i = lo;
    if (streaming) {
      for (; i + 8 <= hi; i += 8) _mm256_stream_ps(z + i, _mm256_loadu_ps(x + i));
      _mm_sfence();
    } else {
      for (; i + 8 <= hi; i += 8) _mm256_storeu_ps(z + i, _mm256_loadu_ps(x + i));
    }
    for (; i < hi; ++i) z[i] = x[i];
  }
}
"""


def build_kernels():
    from torch.utils.cpp_extension import load_inline

    build = Path(tempfile.gettempdir()) / "afa_ext_memory_bandwidth"
    build.mkdir(exist_ok=True)
    return load_inline(
        "afa_ext_memory_bandwidth",
        cpp_sources=KERNELS,
        functions=["read_pair", "stream_difference", "copy"],
        extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
        build_directory=str(build),
        verbose=False,
    )


def has_avx2() -> bool:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return any(line.startswith("flags") and " avx2" in line for line in cpuinfo)
    except OSError:
        return False


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=sorted(multilayer.LAYERS), default="resnet101")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=20)
    return parser.parse_args(argv)


def interleaved_medians(methods: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median seconds per call, each timed call right after an untimed one, in rounds of a
    fresh random order (as bench/timing.py's interleaved_times with settle=1)."""
    samples = timing.interleaved_times(methods, torch.device("cpu"), rounds, settle=1)
    return {name: timing.median(values) for name, values in samples.items()}


def backend_ops(shapes, element: int) -> dict[str, tuple]:
    """The cpu backend's multi-layer spatial ops on features of ``shapes``."""
    ops = torch.ops.afa_ext
    targets = [torch.rand(shape) for shape in shapes]
    sources = [torch.rand(shape) for shape in shapes]
    grads = ops.grouped_spatial_sqdist(targets, sources)
    n = sum(cases.numel(shape) for shape in shapes)

    def both():
        ops.grouped_spatial_sqdist_backward(ops.grouped_spatial_sqdist(targets, sources), targets, sources)

    return {
        "cpu backend: forward": (functools.partial(ops.grouped_spatial_sqdist, targets, sources), 2 * n * element),
        "cpu backend: backward": (
            functools.partial(ops.grouped_spatial_sqdist_backward, grads, targets, sources),
            3 * n * element,
        ),
        "cpu backend: fwd+bwd": (both, 5 * n * element),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    if not has_avx2():
        raise SystemExit("memory_bandwidth.py needs an x86-64 CPU with AVX2")
    kernels = build_kernels()
    shapes = [(args.batch,) + layer for layer in multilayer.LAYERS[args.model]]
    n = sum(cases.numel(shape) for shape in shapes)
    a, b = torch.rand(n), torch.rand(n)
    c = torch.empty(n)
    copy_source = torch.ones((5 * n + 1) // 2)
    copy_target = torch.empty_like(copy_source)
    element = 4
    # name: (call, bytes it is counted as)
    methods = {
        "read pair": (functools.partial(kernels.read_pair, a, b), 2 * n * element),
        "stream difference": (functools.partial(kernels.stream_difference, c, a, b), 3 * n * element),
        "plain copy": (functools.partial(kernels.copy, c, a, False), 2 * n * element),
        "streaming copy": (functools.partial(kernels.copy, c, a, True), 2 * n * element),
        "torch copy_ (5N floor)": (
            functools.partial(copy_target.copy_, copy_source),
            2 * copy_source.numel() * element,
        ),
    }
    if "cpu" in afa_ext.available_backends():
        methods.update(backend_ops(shapes, element))
    description = timing.machine_description(torch.device("cpu"))
    print(f"machine: {timing.machine_line(description)}", file=sys.stderr)
    medians = interleaved_medians({name: call for name, (call, _) in methods.items()}, args.rounds)
    rows: list[list[str]] = []
    for name, (_, counted) in methods.items():
        rows.append(
            [name, f"{counted / 2**20:.0f}", tables.milliseconds(medians[name]), f"{counted / medians[name] / 1e9:.1f}"]
        )
    best = medians["read pair"] + medians["stream difference"]
    floor = medians["torch copy_ (5N floor)"]
    print(
        f"N = {n} float32 elements per array ({args.model}'s hooked layers at batch {args.batch}), "
        f"{args.rounds} interleaved rounds; {description['cpu']}\n"
    )
    print(tables.markdown_table(["traffic", "MiB counted", "ms", "GB/s"], rows, right_align_from=1))
    print(
        f"\nread pair + stream difference (a fwd+bwd's traffic at these bandwidths): "
        f"{best * 1e3:.2f} ms = {best / floor:.2f}x the 5N floor ({floor * 1e3:.2f} ms)"
    )
    if "cpu backend: fwd+bwd" in medians:
        ours = medians["cpu backend: fwd+bwd"]
        print(
            f"cpu backend's four-layer spatial fwd+bwd: {ours * 1e3:.2f} ms = {ours / floor:.2f}x the 5N floor, "
            f"{ours / best:.2f}x what these bandwidths allow"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
