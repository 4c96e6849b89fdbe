"""The served model's tokenizer: byte-level BPE built from GGUF metadata, chat templates."""

from __future__ import annotations

import json
import os
import re
import secrets
from collections.abc import Sequence
from typing import Any

from symphony.engine.errors import LoadError

# GGUF token types (llama.cpp's llama_token_type)
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = range(
    1, 7
)
# Tokens that end an assistant turn in common chat templates, besides the declared eos.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<|endoftext|>", "</s>")

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _pre_tokenizer(pre: str) -> dict[str, Any]:
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True}
    if pre in ("llama-bpe", "llama3", "qwen2", "smaug-bpe"):
        split = {
            "type": "Split",
            "pattern": {"Regex": _LLAMA3_SPLIT},
            "behavior": "Isolated",
            "invert": False,
        }
        return {"type": "Sequence", "pretokenizers": [split, {**byte_level, "use_regex": False}]}
    steps = [{**byte_level, "use_regex": True}]
    if pre == "smollm":  # SmolLM splits every digit on its own, then GPT-2 byte-level
        steps.insert(0, {"type": "Digits", "individual_digits": True})
    return {"type": "Sequence", "pretokenizers": steps}


def build_bpe_tokenizer_json(
    tokens: Sequence[str], merges: Sequence[str], token_types: Sequence[int], pre: str
) -> str:
    """Build a `tokenizers` tokenizer.json for a GPT-2 style byte-level BPE vocabulary."""
    if not tokens:
        raise LoadError("model carries no tokenizer vocabulary")
    added = []
    for i, (token, kind) in enumerate(zip(tokens, token_types, strict=False)):
        if kind in (TOKEN_CONTROL, TOKEN_USER_DEFINED):
            added.append(
                {
                    "id": i,
                    "content": token,
                    "single_word": False,
                    "lstrip": False,
                    "rstrip": False,
                    "normalized": False,
                    "special": kind == TOKEN_CONTROL,
                }
            )
    spec = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": _pre_tokenizer(pre),
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": {token: i for i, token in enumerate(tokens)},
            "merges": [m.split(" ", 1) for m in merges],
        },
    }
    return json.dumps(spec, ensure_ascii=False)


PIECE = 4096  # characters encoded at once (about 2 ms holding the GIL here)
ROLE = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,31}")


class Tokenizer:
    """Encode, decode and render chat templates for the served model."""

    def __init__(
        self,
        tokenizer_json: str,
        chat_template: str | None = None,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
    ) -> None:
        # no rayon pool: a long text would take both cores of a small machine from the
        # engine and the server's loop (a 1 Mi character text held the loop 0.45 s)
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from tokenizers import Tokenizer as HFTokenizer

        try:
            self._tok = HFTokenizer.from_str(tokenizer_json)
        except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
            raise LoadError(f"bad tokenizer.json: {exc}") from exc
        # the same tokenizer reading control tokens' text as plain text (chat content)
        self._plain = HFTokenizer.from_str(tokenizer_json)
        self._plain.encode_special_tokens = True
        self.json = tokenizer_json  # as served (llguidance builds its own from it)
        self.chat_template = chat_template
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        stops = {self._tok.token_to_id(t) for t in END_OF_TURN_TOKENS}
        if eos_token_id is not None:
            stops.add(eos_token_id)
        self.stop_token_ids = frozenset(i for i in stops if i is not None)
        self._template: Any = None
        # byte-level BPE behind a splitting pre-tokenizer, no normalizer: a text cut
        # before the space of " word" encodes as the two halves do
        config = json.loads(tokenizer_json)
        pre = json.dumps(config.get("pre_tokenizer"))
        self._cuttable = (
            config.get("normalizer") is None and "ByteLevel" in pre and "Metaspace" not in pre
        )

    def encode(self, text: str, special: bool = True) -> list[int]:
        """Token ids of `text`; control tokens written in the text are recognised, or
        with `special=False` read as the plain text they are.

        A long text is encoded in pieces cut where the pre-tokenizer cuts anyway (before
        the space of " word" after a non-space): the tokenizers library holds the GIL
        for much of an encode, and a worker thread encoding 1 Mi characters at once kept
        the server's loop waiting half a second.
        """
        tok = self._tok if special else self._plain
        ids: list[int] = []
        for piece in self._pieces(text):
            ids += tok.encode(piece, add_special_tokens=False).ids
        return ids

    def _pieces(self, text: str) -> list[str]:
        if not self._cuttable or len(text) <= PIECE:
            return [text]
        pieces, start = [], 0
        while len(text) - start > PIECE:
            cut = start + PIECE
            # a space between two non-spaces: " word" begins a pre-token there
            while cut < len(text) and not (
                text[cut] == " "
                and not text[cut - 1].isspace()
                and not text[cut + 1 : cut + 2].isspace()
            ):
                cut += 1
            if cut >= len(text) - 1:
                break
            pieces.append(text[start:cut])
            start = cut
        pieces.append(text[start:])
        return pieces

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        return str(self._tok.decode(list(ids), skip_special_tokens=skip_special))

    def token_text(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def render_chat(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool) -> str:
        """Render `messages` through the model's chat template (jinja2, sandboxed)."""
        if self.chat_template is None:
            raise ValueError("the served model has no chat template")
        if self._template is None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

            def raise_exception(message: str) -> None:
                raise ValueError(message)

            env.globals["raise_exception"] = raise_exception
            self._template = env.from_string(self.chat_template)
        special = {
            "bos_token": self._token_or_empty(self.bos_token_id),
            "eos_token": self._token_or_empty(self.eos_token_id),
        }
        return str(
            self._template.render(
                messages=list(messages), add_generation_prompt=add_generation_prompt, **special
            )
        )

    def apply_chat_template(
        self,
        messages: Sequence[dict[str, Any]],
        add_generation_prompt: bool = True,
        special: bool = False,
    ) -> list[int]:
        """Token ids of the rendered chat. Control tokens come from the template only:
        written in a message's content they stay text (no role spoofing), unless
        `special` is asked for.

        Raises:
            ValueError: the template fails, or (without `special`) rewrites contents so
                they cannot be told apart from the template's own text.
        """
        for m in messages:  # a role is a name: text in it would be the template's own
            if not ROLE.fullmatch(str(m.get("role", ""))):
                raise ValueError(f"a role is a name of letters, digits, _ or -: {m.get('role')!r}")
        if special:
            return self.encode(self.render_chat(messages, add_generation_prompt))
        # each content becomes a marker no content holds; the text around the markers
        # is the template's (control tokens recognised), the contents are read as text
        marker = f"\ue000{secrets.token_hex(8)}\ue001"
        marked = [{**m, "content": f"{marker}{i}{marker}"} for i, m in enumerate(messages)]
        pieces = self.render_chat(marked, add_generation_prompt).split(marker)
        if len(pieces) != 2 * len(messages) + 1:
            raise ValueError("the chat template rewrites message contents: ask for special")
        ids: list[int] = []
        for j, piece in enumerate(pieces):
            if j % 2 == 0:
                ids += self.encode(piece)
            elif piece != str((j - 1) // 2):
                raise ValueError("the chat template reorders message contents: ask for special")
            else:
                ids += self.encode(messages[(j - 1) // 2]["content"], special=False)
        return ids

    def _token_or_empty(self, token_id: int | None) -> str:
        if token_id is None:
            return ""
        return self._tok.id_to_token(token_id) or ""


class StreamDecoder:
    """Turns token ids, one at a time, into text pieces, never splitting a UTF-8
    character: the tokenizers library's DecodeStream, so each token costs the same
    however long the text already is."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        from tokenizers.decoders import DecodeStream

        self._tokenizer = tokenizer._tok
        self._stream = DecodeStream(skip_special_tokens=False)

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (may be empty)."""
        piece = self._stream.step(self._tokenizer, token_id)
        return piece or ""
