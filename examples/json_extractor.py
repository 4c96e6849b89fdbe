"""Structured extraction: the answer is JSON that a schema allows, by construction.

The grammar is attached to the KV file (`kv.constrain`), so every token generated after
the prompt must match the schema: the model fills in the values, and the keys, quotes
and brackets it cannot get wrong are appended without sampling.

    lipctl run examples/json_extractor.py "Ada Lovelace, 36, wrote the first program in London."
"""

import json
import sys

from symphony.lipctl import connect

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "city": {"type": "string", "maxLength": 40},
    },
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}

text = " ".join(sys.argv[1:]) or "Grace Hopper, 85, lived in Arlington and wrote compilers."

with connect() as lip:
    lip.mkdir("extract", parents=True)
    messages = [
        {"role": "system", "content": "You extract facts as JSON with name, age and city."},
        {"role": "user", "content": f"Extract the person from: {text}"},
    ]
    kv = lip.kv("extract/person.kv", create=True)
    kv.constrain(None)  # a run after a run (even a failed one) starts afresh
    kv.truncate(0)
    kv.append(lip.apply_chat_template(messages))
    kv.constrain({"json_schema": SCHEMA})  # what follows must match the schema
    result = kv.generate(max_tokens=96, temperature=0.0)
    person = json.loads(result.text)  # always parses: the grammar saw to it
    assert set(person) == {"name", "age", "city"}
    print(f"extracted: {json.dumps(person)}")
    print(f"tokens: {len(result.token_ids)}, finish: {result.finish_reason}")
    kv.unlink()
