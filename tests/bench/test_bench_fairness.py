"""`ladle bench fairness`: the summary (TTFT against idle, the backlogged split) and the CLI's checks."""

from __future__ import annotations

import pytest

from ladle.bench.fairness import FairnessOptions, Sent, summarize
from ladle.cli import main


def test_the_summary_compares_b_to_idle_and_splits_tokens_while_both_wait():
    records = [Sent("b", "idle", 0.0, 0.1), Sent("b", "idle", 1.0, 1.1)]
    records += [Sent("b", "flood", float(i), i + 0.2) for i in range(19)] + [Sent("b", "flood", 19.0, 20.0)]
    records += [Sent("a", "flood", 0.0, 5.0)]
    # backlog: a's last request starts at 2.0 s, b's at 3.0 s: both wait until 2.0 s
    records += [Sent("a", "backlog", 0.0, 2.0, [0.5, 1.0, 2.0, 2.5]), Sent("a", "backlog", 0.0, 0.5, [0.5])]
    records += [Sent("b", "backlog", 0.0, 0.2, [0.2 * i for i in range(1, 10)] + [2.9]), Sent("b", "backlog", 0.0, 3.0)]
    s = summarize(records, FairnessOptions(weight_a=1.0, weight_b=3.0))
    assert s["idle_ttft_ms"]["p50"] == pytest.approx(100.0)
    assert s["flood_b_ttft_ms"]["p50"] == pytest.approx(200.0) and s["flood_b_ttft_ms"]["max"] == pytest.approx(1000.0)
    assert s["backlog_window_s"] == 2.0
    assert s["backlog_tokens"] == {"a": 4, "b": 9} and s["backlog_b_over_a"] == 2.25
    assert s["backlog_split_error"] == 0.25


def test_unknown_policies_are_refused(capsys):
    assert main(["bench", "fairness", "--policies", "vtc,lifo"]) == 2
    assert "lifo" in capsys.readouterr().err
