"""Queue deadlines: a request still waiting, never started, at its deadline ends with finish
reason "timeout" and no tokens (every sample of it); one that started is served to the end."""

from __future__ import annotations

import time

from ladle.engine.llm import LLM
from ladle.sample.params import SamplingParams


def run(engine):
    outs = {}
    while engine.has_unfinished():
        for out in engine.step():
            outs.setdefault((out.request_id, out.index), []).append(out)
    return outs


def test_a_request_waiting_past_its_deadline_times_out_and_the_running_one_finishes(tiny_models):
    llm = LLM(str(tiny_models["llama"].hf_dir), dtype="float32", device="cpu", kv_cache_memory_gib=0.02,
              max_num_seqs=1)  # fmt: skip
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    engine.add_request("first", [5, 6, 7], params, deadline_s=time.monotonic() + 3600)
    engine.step()  # `first` starts: its deadline no longer applies
    engine.add_request("late", [8, 9], SamplingParams(temperature=0.7, seed=1, n=2, max_tokens=6),
                       deadline_s=time.monotonic() - 1)  # fmt: skip
    engine.add_request("patient", [8, 9], params, deadline_s=time.monotonic() + 3600)
    outs = run(engine)
    for index in (0, 1):
        (final,) = outs[("late", index)]
        assert final.finished and final.finish_reason == "timeout" and final.num_output_tokens == 0
    assert outs[("first", 0)][-1].finish_reason == "length"
    assert sum(len(o.new_token_ids) for o in outs[("patient", 0)]) == 6
    assert engine.stats.num_running == 0 and not engine.groups
