"""A chat that runs forever in bounded memory: StreamingLLM's attention sinks.

The file keeps its first tokens (the system prompt: the "sinks" attention leans on) and
the most recent ones. When it grows past its budget, the oldest turns after the sinks go
(`kv.drop(start, end, reposition=True)`): their pages return to the pool, and the tail's
cached keys are re-rotated so positions stay contiguous, so the context never runs out.

    lipctl run examples/attention_sink_chat.py 12 400    # turns, token budget
"""

import sys

from symphony.lipctl import connect

turns = int(sys.argv[1]) if len(sys.argv) > 1 else 12
budget = int(sys.argv[2]) if len(sys.argv) > 2 else 400
QUESTIONS = [
    "Name a planet.",
    "Say something about rivers.",
    "What is two plus two?",
    "Give me a word that rhymes with cat.",
    "Describe the sea in five words.",
]

with connect() as lip:
    lip.mkdir("chat", parents=True)
    system = {"role": "system", "content": "You are a brief assistant. Answer in a sentence."}
    sink_ids = lip.apply_chat_template([system], add_generation_prompt=False)
    kv = lip.kv("chat/sinks.kv", create=True)
    kv.truncate(0)
    kv.append(sink_ids)
    sinks = len(sink_ids)
    most_pages = 0
    for turn in range(turns):
        question = QUESTIONS[turn % len(QUESTIONS)]
        # this turn's tokens: the conversation's rendering past the system turn
        ids = lip.apply_chat_template([system, {"role": "user", "content": question}])
        kv.append(ids[len(sink_ids) :])
        answer = kv.generate(max_tokens=32, temperature=0.0)
        kv.append(lip.tokenize("\n"))  # the template's newline after the end of a turn
        stat = kv.stat()
        if stat["tokens"] > budget:  # keep the sinks and the newest half of the budget
            excess = stat["tokens"] - budget // 2
            kv.drop(sinks, sinks + excess, reposition=True)
            stat = kv.stat()
        most_pages = max(most_pages, stat["pages"])
        print(
            f"turn {turn + 1}: {question!r} -> {answer.text.strip()[:60]!r} "
            f"[tokens {stat['tokens']}, next position {stat['next_position']}, "
            f"pages {stat['pages']}]"
        )
    page_size = lip.call("hello")["model"]["page_size"]
    print(f"bounded: {most_pages <= -(-budget // page_size) + 1}")
    kv.unlink()
