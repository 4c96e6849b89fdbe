"""Beam search, driven token by token from the LIP: each beam is a KV file, forks share pages.

lipctl run examples/beam_search.py [BEAMS] [STEPS] "prompt"
"""

import sys
import time

from symphony.lipctl import connect

BEAMS = int(sys.argv[1]) if len(sys.argv) > 1 else 3
STEPS = int(sys.argv[2]) if len(sys.argv) > 2 else 12
PROMPT = sys.argv[3] if len(sys.argv) > 3 else "Write a title for a story about a lighthouse."

with connect() as lip:
    lip.mkdir("beams", parents=True)
    tag = time.time_ns()
    ids = lip.apply_chat_template([{"role": "user", "content": PROMPT}])
    root = lip.kv(f"beams/{tag}-root.kv", create=True)
    root.append(ids[:-1])
    # a beam: (score, file, token to feed next, tokens chosen so far)
    beams = [(0.0, root, ids[-1], [])]
    stop = set(lip.tokenize("<|im_end|>"))
    serial = 0
    for _ in range(STEPS):
        candidates = []
        for score, kv, pending, chosen in beams:
            if chosen and chosen[-1] in stop:
                candidates.append((score, kv, None, chosen))  # finished beams stay
                continue
            # feed the token, see the likeliest next ones
            out = kv.forward([pending], outputs=[{"top_k": BEAMS}])
            for token, logprob in out.outputs[0].top_k or ():
                candidates.append((score + logprob, kv, token, [*chosen, token]))
        candidates.sort(key=lambda c: -c[0])
        survivors, used = [], set()
        for score, kv, token, chosen in candidates[:BEAMS]:
            if token is None:
                survivors.append((score, kv, chosen[-1], chosen))
                used.add(kv.path)
                continue
            serial += 1
            child = kv.fork(f"beams/{tag}-{serial}.kv")  # shares every page of its parent
            survivors.append((score, child, token, chosen))
        for _, kv, _, _ in beams:
            if kv.path not in used:
                kv.unlink()
        beams = survivors
    for rank, (score, kv, _, chosen) in enumerate(beams):
        print(f"beam {rank}: logprob {score:7.3f}  {lip.detokenize(chosen, skip_special=True)!r}")
        print(f"         {kv.stat()['shared_pages']} of {kv.stat()['pages']} pages shared")
    for _, kv, _, _ in beams:
        kv.unlink()
