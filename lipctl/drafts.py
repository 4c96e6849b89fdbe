"""Drafts for speculative decoding from the text itself: prompt lookup's n-gram pool,
which examples/speculative.py and examples/jacobi_decoding.py both draw from."""

from __future__ import annotations


class NgramPool:
    """A growing text and where each of its n-grams (n in min_n..max_n) first ended: a
    draft is what followed the longest n-gram that ends the text, where it first
    occurred (the first, as prompt lookup takes: mostly in the prompt, with a whole
    draft after it). Each token added costs a few dict writes, not a scan."""

    def __init__(self, max_n: int = 3, min_n: int = 2) -> None:
        self.text: list[int] = []
        self.sizes = range(max_n, min_n - 1, -1)
        self.first_end: dict[tuple[int, ...], int] = {}

    def extend(self, tokens: list[int]) -> None:
        """Add `tokens` to the text, and note where each new n-gram ends."""
        for token in tokens:
            self.text.append(token)
            end = len(self.text)
            for n in self.sizes:
                if end >= n:
                    self.first_end.setdefault(tuple(self.text[end - n :]), end)

    def draft(self, length: int) -> list[int]:
        """Up to `length` tokens after the longest tail n-gram seen before; [] if none."""
        for n in self.sizes:
            end = self.first_end.get(tuple(self.text[-n:]), len(self.text))
            if end < len(self.text):  # an earlier occurrence, not the tail itself
                return self.text[end : end + length]
        return []
