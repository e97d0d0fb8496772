"""The prefix-order bench's pure parts: the batch it builds and what it reports."""

from __future__ import annotations

import collections

from bench.prefix_order import PrefixBenchOptions, build_batch, summarize, with_ratio


def test_the_batch_uses_every_header_equally_in_a_seeded_shuffled_order():
    opts = PrefixBenchOptions(num_requests=48, num_templates=6, header_words=30)
    batch = build_batch(opts)
    assert collections.Counter(t for t, _ in batch) == {f"t{i}": 8 for i in range(6)}
    assert batch == build_batch(opts) and batch != build_batch(PrefixBenchOptions(num_requests=48, num_templates=6,
                                                                                    header_words=30, seed=1))
    # Arrival order interleaves the templates (else FCFS would already be grouped).
    assert len({t for t, _ in batch[:6]}) > 2
    # Requests of one template share the header and differ after it.
    same = [p for t, p in batch if t == "t0"]
    head = same[0].split("\nItem")[0]
    assert all(p.startswith(head) for p in same) and len(set(same)) == len(same)


def test_summary_and_ratio():
    a = summarize("fcfs", 10.0, 80, 4000, 3000, 20)
    b = summarize("prefix_sharing", 5.0, 80, 4000, 1000, 20)
    assert a["prefix_cache_share"] == 0.25 and b["prefix_cache_share"] == 0.75
    rows = with_ratio([a, b])
    assert rows[0]["throughput_vs_fcfs"] == 1.0 and rows[1]["throughput_vs_fcfs"] == 2.0
