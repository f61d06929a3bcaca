"""State the Triton host code keeps between launches (afa_ext/ops/triton/launch.py).

The tests that launch kernels need a GPU or TRITON_INTERPRET=1 (Triton's interpreter on
CPU tensors, slow, so the shapes are tiny); those of the host logic alone (table caches,
grid limits on meta tensors) only need triton installed.
"""

from __future__ import annotations

import pytest
import torch

import afa_ext
import float64_model
from loss_cases import relative_error

triton = pytest.importorskip("triton")

from afa_ext.ops.triton import launch  # noqa: E402  (after the importorskip)

INTERPRETED = afa_ext.ops.backends.triton_interpreted()
DEVICE = "cpu" if INTERPRETED else "cuda"
needs_kernels = pytest.mark.skipif(
    "triton" not in afa_ext.available_backends(),
    reason="launching the kernels needs a CUDA device or TRITON_INTERPRET=1",
)
OPS = torch.ops.afa_ext_triton  # registered by the lookup of the triton backend just above
MANY_SPLITS = launch.SplitPolicy(target_programs=4096, min_k_per_split=1)


def _features(shape, seed, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    target = torch.randn(shape, generator=generator, dtype=dtype)
    source = torch.randn(shape, generator=generator, dtype=dtype)
    return target.to(DEVICE), source.to(DEVICE)


def _assert_forward_matches_model(partials, targets, sources, grouping, tolerance=2e-6):
    for partial, target, source in zip(partials, targets, sources):
        assert relative_error(partial.cpu(), float64_model.partial_sums(grouping, target, source)) <= tolerance


# --------------------------------------------------------------------------- split counters


@pytest.fixture
def atomics_that_fail_after(monkeypatch):
    """Makes the interpreter's atomic read-modify-write ops raise from the ``calls``-th
    one on, as a launch aborted part-way through its grid would stop."""
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    original = builder.create_atomic_rmw

    def install(calls: int) -> None:
        count = [0]

        def failing(*args, **kwargs):
            count[0] += 1
            if count[0] >= calls:
                raise RuntimeError("launch aborted by the test")
            return original(*args, **kwargs)

        monkeypatch.setattr(builder, "create_atomic_rmw", failing)

    return install


@pytest.mark.skipif(not INTERPRETED, reason="aborts a launch through Triton's interpreter")
@pytest.mark.parametrize("grouping", ["channel", "spatial"])
def test_an_aborted_split_forward_leaves_later_sums_right(grouping, atomics_that_fail_after, monkeypatch):
    """A launch that stops part-way (here: its second atomic raises) leaves counters of
    its row blocks half-counted; a later split forward on the same stream must not see them."""
    monkeypatch.setattr(launch, "default_policy", lambda device: MANY_SPLITS)
    shape = (2, 4, 12, 12) if grouping == "channel" else (2, 192, 2, 3)
    aborted_target, aborted_source = _features(shape, seed=1)
    plan = launch.plan_layer(aborted_target, aborted_source, None, grouping)
    assert launch._splits([plan], plan.rows_fast, MANY_SPLITS)[0][0] >= 3

    atomics_that_fail_after(2)
    with pytest.raises(Exception, match="launch aborted by the test"):
        getattr(OPS, f"grouped_{grouping}_sqdist")([aborted_target], [aborted_source])
    monkeypatch.undo()
    monkeypatch.setattr(launch, "default_policy", lambda device: MANY_SPLITS)

    target, source = _features(shape, seed=2)
    for _ in range(2):
        partials = getattr(OPS, f"grouped_{grouping}_sqdist")([target], [source])
        _assert_forward_matches_model(partials, [target], [source], grouping)


# --------------------------------------------------------------------------- layer tables


def _table_rows(seed: int):
    return [[seed * 1000 + 7 * row + column for column in range(5)] for row in range(3)]


@pytest.fixture
def fake_streams(monkeypatch):
    """Stands in for CUDA's stream queries: ``streams.current`` is the stream every thread
    sees unless ``streams.per_thread`` maps the thread to its own; ``streams.capturing``
    says whether that stream is being captured into a CUDA graph. Records the stream each
    table was copied to the device on, by the table's id."""
    import threading

    class Streams:
        current = 11
        capturing = False
        per_thread = {}
        copied_on = {}

        def now(self) -> int:
            return self.per_thread.get(threading.get_ident(), self.current)

    streams = Streams()
    original_copy = launch._copied_to_device

    def copy_recording_stream(host, device):
        table = original_copy(host, device)
        streams.copied_on[id(table)] = streams.now()
        return table

    monkeypatch.setattr(launch, "_current_stream", lambda device: streams.now())
    monkeypatch.setattr(launch, "_capturing", lambda device: streams.capturing)
    monkeypatch.setattr(launch, "_copied_to_device", copy_recording_stream)
    monkeypatch.setattr(launch, "_TABLES", type(launch._TABLES)())
    monkeypatch.setattr(launch, "_CAPTURED_HOST_TABLES", [])
    return streams


def test_each_stream_gets_its_own_table_made_on_it(fake_streams):
    """A table copied on one stream is never read by a kernel on another (no ordering
    between them), so the same rows asked for on two streams give two tables."""
    rows, device = _table_rows(1), torch.device("cpu")
    fake_streams.current = 11
    on_first = launch._device_table(rows, device)
    fake_streams.current = 22
    on_second = launch._device_table(rows, device)
    assert on_first is not on_second
    assert fake_streams.copied_on[id(on_first)] == 11 and fake_streams.copied_on[id(on_second)] == 22
    assert torch.equal(on_first, torch.tensor(rows)) and torch.equal(on_second, torch.tensor(rows))
    fake_streams.current = 11
    assert launch._device_table(rows, device) is on_first  # reused on its own stream
    fake_streams.current = 22
    assert launch._device_table(rows, device) is on_second


def test_a_captured_launch_neither_reuses_nor_stores_a_table_and_keeps_its_host_copy(fake_streams, monkeypatch):
    """Under CUDA graph capture a cached table could be evicted and freed before a replay
    reads it, and the captured copy re-reads its pinned host source at every replay."""
    rows, device = _table_rows(2), torch.device("cpu")
    cached = launch._device_table(rows, device)
    cache_before = list(launch._TABLES.items())
    host_tables = []
    original_host_table = launch._host_table

    def recording_host_table(table_rows, table_device):
        host_tables.append(original_host_table(table_rows, table_device))
        return host_tables[-1]

    monkeypatch.setattr(launch, "_host_table", recording_host_table)
    fake_streams.capturing = True
    captured = [launch._device_table(rows, device), launch._device_table(_table_rows(3), device)]
    assert captured[0] is not cached and captured[1] is not captured[0]
    assert torch.equal(captured[0], torch.tensor(rows)) and torch.equal(captured[1], torch.tensor(_table_rows(3)))
    assert list(launch._TABLES.items()) == cache_before
    assert len(host_tables) == 2
    assert all(any(kept is host for kept in launch._CAPTURED_HOST_TABLES) for host in host_tables)


def test_threads_asking_at_once_get_their_own_tables(fake_streams, monkeypatch):
    """Many threads, each on its own stream, asking for tables while a tiny cache evicts."""
    import sys
    import threading

    monkeypatch.setattr(launch, "_TABLE_CACHE_SIZE", 3)
    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    threads_count, rounds = 8, 200
    errors, barrier = [], threading.Barrier(threads_count)

    def ask(thread_index):
        fake_streams.per_thread[threading.get_ident()] = 100 + thread_index
        barrier.wait()
        try:
            for round_index in range(rounds):
                rows = _table_rows(thread_index * rounds + round_index % 5)
                table = launch._device_table(rows, torch.device("cpu"))
                if (
                    not torch.equal(table, torch.tensor(rows))
                    or fake_streams.copied_on[id(table)] != 100 + thread_index
                ):
                    errors.append((thread_index, round_index))
        except Exception as error:  # noqa: BLE001  (reported by the assertion below)
            errors.append(repr(error))

    try:
        threads = [threading.Thread(target=ask, args=(index,)) for index in range(threads_count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(switch_interval)
    assert errors == []
    assert len(launch._TABLES) <= 3


# --------------------------------------------------------------------------- the tuner


@pytest.fixture
def launches(monkeypatch):
    """Records the block configuration of every kernel launch, in order, and starts with
    no tuning decisions."""
    recorded = []
    original = launch._launch_kernel

    def recording(kernel, config, grid_size, args, constexprs):
        recorded.append(config)
        return original(kernel, config, grid_size, args, constexprs)

    monkeypatch.setattr(launch, "_launch_kernel", recording)
    monkeypatch.setattr(launch, "_CHOSEN", {})
    return recorded


def _favouring(favoured, timed):
    """A timer that runs each configuration once and reports ``favoured`` as the fastest."""

    def fake_timer(config, run):
        run()
        timed.append(config)
        return 1.0 if config == favoured else 2.0

    return fake_timer


@needs_kernels
def test_the_autotune_setting_is_read_at_every_launch(launches, monkeypatch):
    """AFA_EXT_TRITON_AUTOTUNE=0 runs the first configuration untimed; switching it on
    between calls times them and launches the fastest; switching it off again returns to
    the first."""
    candidates = launch.configs(False)
    assert len(candidates) >= 2
    timed = []
    monkeypatch.setattr(launch, "_measure_milliseconds", _favouring(candidates[1], timed))
    target, source = _features((2, 4, 6, 6), seed=3)
    plan = launch.plan_layer(target, source, None, "channel")
    assert not plan.rows_fast

    for setting, expected_config, expected_timings in [("0", 0, 0), ("1", 1, len(candidates)), ("0", 0, 0)]:
        monkeypatch.setenv("AFA_EXT_TRITON_AUTOTUNE", setting)
        launches.clear()
        timed.clear()
        partials = OPS.grouped_channel_sqdist([target], [source])
        assert launches[-1] == candidates[expected_config] and len(timed) == expected_timings
        _assert_forward_matches_model(partials, [target], [source], "channel")


_RANKS_WORKER = """
    from afa_ext.ops.triton import launch, library  # library registers torch.ops.afa_ext_triton
    import float64_model

    candidates = launch.configs(False)
    favoured = candidates[1 - rank]  # rank 0's timings favour the second config, rank 1's the first
    timed, launched = [], []
    def fake_timer(config, run):
        run()
        timed.append(config)
        return 1.0 if config == favoured else 2.0
    launch._measure_milliseconds = fake_timer
    original_launch = launch._launch_kernel
    def recording(kernel, config, grid_size, args, constexprs):
        launched.append(config)
        original_launch(kernel, config, grid_size, args, constexprs)
    launch._launch_kernel = recording

    generator = torch.Generator().manual_seed(5 + rank)
    target, source = torch.randn(2, 4, 12, 12, generator=generator), torch.randn(2, 4, 12, 12, generator=generator)
    grad = torch.rand(2, 4, generator=generator)
    many = launch.SplitPolicy(target_programs=4096, min_k_per_split=1)
    default_policy, launch.default_policy = launch.default_policy, lambda device: many
    partial = torch.ops.afa_ext_triton.grouped_channel_sqdist([target], [source])[0]
    launch.default_policy = default_policy
    forward_config = launched[-1]
    gradient = torch.ops.afa_ext_triton.grouped_channel_sqdist_backward([grad], [target], [source])[0]
    result = dict(
        forward_config=forward_config, backward_config=launched[-1], timed=timed, candidates=candidates,
        splits=launch._splits([launch.plan_layer(target, source, None, "channel")], False, many)[0][0],
        partial=partial, expected_partial=float64_model.partial_sums("channel", target, source),
        gradient=gradient, expected_gradient=float64_model.partial_sums_backward("channel", grad, target, source),
    )
"""


@pytest.mark.skipif(not INTERPRETED, reason="runs the kernels in two CPU processes through Triton's interpreter")
def test_every_rank_launches_with_rank_zeros_tuned_config(tmp_path):
    """Each rank's (fake) timings favour a different configuration; both launch rank 0's,
    and the split forward and the backward still give the model's values."""
    import os
    from pathlib import Path

    from two_processes import run_two_ranks

    search_path = [str(Path(__file__).resolve().parents[2])] + os.environ.get("PYTHONPATH", "").split(os.pathsep)
    environment = {"TRITON_INTERPRET": "1", "AFA_EXT_TRITON_AUTOTUNE": "1", "PYTHONPATH": os.pathsep.join(search_path)}
    results = run_two_ranks(_RANKS_WORKER, tmp_path, env=environment, timeout=300)
    candidates = results[0]["candidates"]
    assert results[1]["candidates"] == candidates
    for rank, result in enumerate(results):
        assert result["splits"] > 1
        assert result["forward_config"] == candidates[1] and result["backward_config"] == candidates[1]
        assert relative_error(result["partial"], result["expected_partial"]) <= 2e-6
        assert relative_error(result["gradient"], result["expected_gradient"]) <= 2e-6
    assert results[0]["timed"] == candidates * 2  # rank 0 timed every config of both kernels
    assert results[1]["timed"] == []  # rank 1 took rank 0's decision


# --------------------------------------------------------------------------- grid limits


@pytest.mark.parametrize("grouping", ["channel", "spatial"])
def test_a_launch_beyond_the_grid_is_refused_before_it_starts(grouping, monkeypatch):
    """The grid's first dimension holds 2**31 - 1 programs (as the CUDA launch checks);
    meta tensors give the huge shapes for free."""

    def no_launch(*args, **kwargs):
        raise AssertionError("launched")

    monkeypatch.setattr(launch, "_launch_kernel", no_launch, raising=False)
    shape = (2**20, 2**20, 4) if grouping == "channel" else (2**20, 4, 2**20)
    target = torch.empty(shape, device="meta")
    rows = 2**40  # B * C for the channel grouping, B * P for the spatial one
    biggest_block = max(
        config.block_r for config in launch.configs(launch.plan_layer(target, target, None, grouping).rows_fast)
    )
    fewest_programs = rows // biggest_block
    limit = 2**31 - 1
    assert fewest_programs > limit
    op = f"afa_ext_triton::grouped_{grouping}_sqdist"
    message = rf"{op}: .*{fewest_programs} Triton programs.* {limit}"
    with pytest.raises(RuntimeError, match=message):
        launch.sqdist_forward([target], [target], grouping, op=op)
    grad = torch.empty(2**20, 2**20, device="meta")  # (B, C) or (B, P)
    with pytest.raises(RuntimeError, match=message.replace("sqdist", "sqdist_backward")):
        launch.sqdist_backward([grad], [target], [target], grouping, op=op + "_backward")
