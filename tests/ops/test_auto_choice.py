"""``auto`` between the GPU backends: the measured faster one, remembered per key."""
from __future__ import annotations

import time

import torch

from afa_ext.ops import auto_choice


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
    assert auto_choice.measured_choices()[key] == "fast"


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
