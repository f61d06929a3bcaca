"""One decision for every rank: rank 0's, broadcast (afa_ext/ops/rank_zero.py)."""

from __future__ import annotations

from afa_ext.ops.rank_zero import decided_by_rank_zero, distributed_world
from two_processes import run_two_ranks


def test_outside_a_distributed_job_the_decision_is_local():
    assert not distributed_world()
    assert decided_by_rank_zero(lambda: ("local", 3)) == ("local", 3)


def test_every_rank_gets_rank_zeros_decision_and_only_rank_zero_decides(tmp_path):
    results = run_two_ranks(
        """
        from afa_ext.ops.rank_zero import decided_by_rank_zero
        calls = []
        def decide():
            calls.append(rank)
            return {"config": 10 + rank}
        result = [decided_by_rank_zero(decide), decided_by_rank_zero(lambda: "second %d" % rank), calls]
    """,
        tmp_path,
    )
    assert results[0] == [{"config": 10}, "second 0", [0]]
    assert results[1] == [{"config": 10}, "second 0", []]
