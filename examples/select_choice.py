"""Pick an answer among choices in one step (SGLang's `select`), then sample a word.

    lipctl run examples/select_choice.py "Which is a fruit?" apple car cloud

`kv.score(choices)` scores every continuation in one forward that appends nothing: the
choices sit side by side after the question, each seeing the question and itself only
(an attention mask), and the result is each one's mean logprob per token. `kv.sample()`
draws the token that would follow, again appending nothing.
"""

import sys

from symphony.lipctl import connect

question = sys.argv[1] if len(sys.argv) > 1 else "Which of these is a fruit?"
choices = sys.argv[2:] or ["an apple", "a car", "a cloud", "a song"]

with connect() as lip:
    lip.mkdir("select", parents=True)
    kv = lip.kv("select/question.kv", create=True)
    kv.truncate(0)
    kv.append(lip.apply_chat_template([{"role": "user", "content": question}]))
    kv.append(lip.tokenize("The answer is"))
    options = [lip.tokenize(" " + c) for c in choices]
    scores = kv.score(options)
    for choice, score in sorted(zip(choices, scores, strict=True), key=lambda cs: -cs[1]):
        print(f"{score:8.3f}  {choice}")
    best = choices[max(range(len(choices)), key=scores.__getitem__)]
    print(f"chosen: {best}")
    after = kv.sample(temperature=0.0)
    print(f"the model's own next token: {lip.detokenize([after])!r}")
    print(f"file still {kv.stat()['tokens']} tokens")  # neither call appended
    kv.unlink()
