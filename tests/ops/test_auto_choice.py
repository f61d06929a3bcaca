"""``auto`` between the GPU backends: the measured faster one, remembered per key."""

from __future__ import annotations

import time

import torch

from afa_ext.ops import auto_choice
from two_processes import run_two_ranks


def _sleeper(seconds, calls):
    def run():
        calls.append(seconds)
        time.sleep(seconds)

    return run


def test_picks_the_faster_candidate_once_and_remembers_it():
    calls = []
    key = ("test", "slow-first")
    candidates = {"slow": _sleeper(0.02, calls), "fast": _sleeper(0.001, calls)}
    assert auto_choice.choose_fastest(key, candidates, lambda: None) == "fast"
    measured = len(calls)
    assert measured == 2 * (auto_choice.REPEATS + 1)
    assert auto_choice.choose_fastest(key, candidates, lambda: None) == "fast"
    assert len(calls) == measured, "a measured key is not timed again"
    assert auto_choice._CHOICES[key] == "fast"


def test_single_candidate_is_not_timed():
    calls = []
    assert auto_choice.choose_fastest(("test", "one"), {"only": _sleeper(0.0, calls)}, lambda: None) == "only"
    assert calls == []


def test_tracing_takes_the_first_candidate_without_timing():
    calls = []
    candidates = {"first": _sleeper(0.01, calls), "second": _sleeper(0.0, calls)}

    def pick(x):
        return x + (1 if auto_choice.choose_fastest(("test", "traced"), candidates, lambda: None) == "first" else 2)

    assert torch.compile(pick, fullgraph=True, backend="eager")(torch.zeros(1)).item() == 1
    assert calls == []


def test_layers_key_tells_layouts_apart():
    a = torch.zeros(2, 3, 4, 4)
    b = a.contiguous(memory_format=torch.channels_last)
    assert auto_choice.layers_key("channel", [a]) != auto_choice.layers_key("channel", [b])
    assert auto_choice.layers_key("channel", [a]) != auto_choice.layers_key("spatial", [a])


def test_every_rank_takes_rank_zeros_measured_choice(tmp_path):
    """Under torch.distributed, rank 0 measures and every rank gets its winner: here the
    timings favour a different candidate on each rank, and rank 1 never runs its own."""
    results = run_two_ranks(
        """
        import time
        from afa_ext.ops import auto_choice
        calls = []
        def sleeper(name, seconds):
            def run():
                calls.append(name)
                time.sleep(seconds)
            return run
        fast, slow = 0.001, 0.02
        a_faster_on_rank_0 = {"a": sleeper("a", fast if rank == 0 else slow),
                              "b": sleeper("b", slow if rank == 0 else fast)}
        b_faster_on_rank_0 = {"a": sleeper("a", slow if rank == 0 else fast),
                              "b": sleeper("b", fast if rank == 0 else slow)}
        result = [auto_choice.choose_fastest(("test", "ranks", 1), a_faster_on_rank_0, lambda: None),
                  auto_choice.choose_fastest(("test", "ranks", 2), b_faster_on_rank_0, lambda: None),
                  auto_choice.choose_fastest(("test", "ranks", 1), b_faster_on_rank_0, lambda: None),
                  len(calls)]
    """,
        tmp_path,
    )
    runs_per_key = 2 * (auto_choice.REPEATS + 1)
    assert results[0] == ["a", "b", "a", 2 * runs_per_key]
    assert results[1] == ["a", "b", "a", 0]


def _no_collective(decide):
    raise AssertionError("this choice must be taken by each rank alone, without a collective")


def test_the_choice_while_tracing_runs_no_collective(monkeypatch):
    monkeypatch.setattr(auto_choice, "decided_by_rank_zero", _no_collective)
    calls = []
    candidates = {"first": _sleeper(0.0, calls), "second": _sleeper(0.0, calls)}

    def pick(x):
        return x + (
            1 if auto_choice.choose_fastest(("test", "traced", "local"), candidates, lambda: None) == "first" else 2
        )

    assert torch.compile(pick, fullgraph=True, backend="eager")(torch.zeros(1)).item() == 1
    assert calls == []


def test_a_measurement_goes_through_the_rank_zero_decision(monkeypatch):
    decisions = []

    def recorded(decide):
        decisions.append(decide())
        return "first"  # what rank 0 would have broadcast, whatever this rank measured

    monkeypatch.setattr(auto_choice, "decided_by_rank_zero", recorded)
    calls = []
    candidates = {"first": _sleeper(0.02, calls), "second": _sleeper(0.001, calls)}
    assert auto_choice.choose_fastest(("test", "broadcast"), candidates, lambda: None) == "first"
    assert decisions == ["second"]


def test_a_pinned_choice_runs_no_collective(monkeypatch):
    monkeypatch.setattr(auto_choice, "decided_by_rank_zero", _no_collective)
    monkeypatch.setenv("AFA_EXT_AUTO_CUDA", "second")
    calls = []
    candidates = {"first": _sleeper(0.0, calls), "second": _sleeper(0.0, calls)}
    assert auto_choice.choose_fastest(("test", "pinned", "local"), candidates, lambda: None) == "second"
    assert calls == []
