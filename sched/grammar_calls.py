"""Grammars on the wire: compiling a call's `grammar` argument, and kv_constrain."""

from __future__ import annotations

import errno
from typing import Any

from symphony.fs.errors import StoreError
from symphony.fs.grammar import Grammar, GrammarSpec
from symphony.fs.nodes import W_OK
from symphony.sched import schema as S
from symphony.sched.calls import Call, Syscalls, syscall


async def compile_grammar(sys: Syscalls, call: Call, value: Any) -> Grammar:
    """The matcher of a `grammar` argument, compiled in a worker thread (a large grammar
    takes long), one at a time per user.

    Raises:
        StoreError: EINVAL with the parser's message; ENOTSUP without a compiler.
    """
    grammars = sys.store.grammars
    if grammars is None:
        raise StoreError(errno.ENOTSUP, "this server has no grammar compiler")
    spec = GrammarSpec.from_wire(value)
    grammar: Grammar = await sys.in_worker(call, grammars.compile, spec)
    return grammar


@syscall("kv_constrain")
async def _kv_constrain(sys: Syscalls, call: Call, a: S.KvConstrain) -> Any:
    grammar = None if a.grammar is None else await compile_grammar(sys, call, a.grammar)
    file = sys.store.ns.lookup_file(a.path, call.cred, W_OK)
    sys.store.constrain(file, grammar)
    return sys.store.file_stat(file)
