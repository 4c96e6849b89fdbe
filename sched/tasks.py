"""Work the batch loop runs: appends to KV files, with a sampled token or a whole generation."""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch
import trio

from symphony.engine.sampling import SamplingParams, make_generator
from symphony.fs.appends import AppendPlan
from symphony.fs.charges import Holder
from symphony.fs.errors import StoreError
from symphony.fs.grammar import Grammar
from symphony.fs.nodes import KVFile
from symphony.sched.generation import GenerateState
from symphony.sched.outputs import OutputSpec
from symphony.sched.speculative import VerifyState

_arrivals = itertools.count()

MAX_STREAMS = 256  # seeded random streams a program keeps (least recently used go)


@dataclass
class Account:
    """What the scheduler knows of a program: priority class, attained service, the
    pages it holds."""

    pid: int
    priority: int = 0  # higher runs first
    tokens_computed: int = 0  # attained service, for least-attained-service order
    tokens_planned: int = 0  # begun and not yet computed (the token quota counts them)
    page_quota: int | None = None
    token_quota: int | None = None
    uid: int = 0  # whose share of the pool its pages count in, and whose service
    holder: Holder = field(init=False)  # the pages it took and still holds
    streams: OrderedDict[int, torch.Generator] = field(default_factory=OrderedDict)

    def __post_init__(self) -> None:
        self.holder = Holder(self.uid, self.page_quota)

    @property
    def pages_allocated(self) -> int:
        """Pages taken for it and not yet freed (a truncate or unlink gives them back)."""
        return self.holder.pages

    def stream(self, seed: int, device: str | torch.device) -> torch.Generator:
        """The program's random stream named `seed`: made on first use, then advancing
        with each draw, so a per-token program with one seed gets a fresh draw each call."""
        generator = self.streams.get(seed)
        if generator is None:
            generator = self.streams[seed] = make_generator(seed, device)
            if len(self.streams) > MAX_STREAMS:
                self.streams.popitem(last=False)
        self.streams.move_to_end(seed)
        return generator


@dataclass
class Task:
    """Append `tokens` to `file`, computing them, and answer what `outputs` asks at
    chosen new-token indices (-1: the file's last token, computed again); or verify a
    draft; or keep generating.

    The batch loop owns everything here once submitted; others only read `done`.
    """

    account: Account
    file: KVFile
    tokens: list[int]  # to append (begun or not)
    outputs: dict[int, OutputSpec] = field(default_factory=dict)
    params: SamplingParams | None = None
    generator: torch.Generator | None = None
    positions: list[int] | None = None  # of the new tokens; None: after the file's last
    visible: list[list[int] | None] | None = None  # per new token's attention ranges
    keep: bool = True  # False: compute and answer, append nothing
    reuse: bool = True  # may take pages from the prefix index (the file's owner asks)
    generate: GenerateState | None = None
    verify: VerifyState | None = None
    grammar: Grammar | None = None  # the file's, a copy of it (keep=False), or the call's
    feed_grammar: bool = True  # False while the tokens are the prompt of a call's grammar
    fed: int = 0  # tokens of this append the grammar has taken
    plan: AppendPlan | None = None
    computed: int = 0  # of plan.compute_ids
    answers: dict[int, dict[str, Any]] = field(default_factory=dict)  # by output index
    rows: dict[int, int] = field(default_factory=dict)  # compute index -> output index
    cached: int = 0  # new tokens the prefix index supplied
    failure: StoreError | None = None  # a row of an earlier chunk failed
    in_flight: bool = False
    cancelled: bool = False
    arrival: int = field(default_factory=lambda: next(_arrivals))
    done: trio.Event = field(default_factory=trio.Event)
    result: dict[str, Any] | None = None
    error: StoreError | None = None

    @property
    def remaining(self) -> int:
        """Tokens still to compute for the current append."""
        if self.plan is None:
            return 0
        return len(self.plan.compute_ids) - self.computed

    @property
    def recompute_last(self) -> bool:
        """Whether the prediction after the file's last token is wanted."""
        return -1 in self.outputs or (self.verify is not None and self.verify.first == -1)

    @property
    def samples(self) -> bool:
        return any(spec.sample for spec in self.outputs.values())

    def sort_key(self) -> tuple[int, int, int]:
        # priority classes first, then least attained service, then arrival
        return (-self.account.priority, self.account.tokens_computed, self.arrival)
