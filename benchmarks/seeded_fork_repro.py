"""The seeded n=2 request of the server test (issue "Same seed, same text"), alone and then sharing its
steps with 1 to 8 other requests (offline, default dtype): prints whether its two samples keep their text.

    .venv/bin/python benchmarks/seeded_fork_repro.py
"""

from __future__ import annotations

from ladle.engine.llm import LLM
from ladle.sample.params import SamplingParams

llm = LLM(max_model_len=1024, kv_cache_memory_gib=0.25)
msgs = [{"role": "user", "content": "Name an animal."}]
ids = llm.tokenizer.encode_chat(msgs)
kw = SamplingParams(max_tokens=64, n=2, temperature=1.0, seed=42)
alone = [s.token_ids for s in llm.generate([ids], kw)[0].samples]
diff = 0
for k in range(1, 9):
    others = [llm.tokenizer.encode(f"Story {i}:") for i in range(k)]
    res = llm.generate([ids] + others, [kw] + [SamplingParams(max_tokens=80, temperature=0.7, ignore_eos=True)] * k)
    got = [s.token_ids for s in res[0].samples]
    diff += got != alone
    print(k, "others:", "same" if got == alone else "DIFFERENT", llm.tokenizer.decode(got[0]) if got != alone else "")
print("differing batch compositions:", diff, "of 8")
