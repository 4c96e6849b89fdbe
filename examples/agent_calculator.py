"""An agent whose tool, a small calculator, runs inside the LIP between generations.

The program opens the assistant's turn with a tool call, lets the model write only
an arithmetic expression (a token mask allows digits and operators), evaluates it
itself, appends the result to the context and lets the model write the answer.

    lipctl run examples/agent_calculator.py "What is 17 times 23?"
"""

import ast
import operator
import sys
import time

from symphony.lipctl import connect

QUESTION = (
    sys.argv[1] if len(sys.argv) > 1 else "A crate holds 17 rows of 23 apples. How many apples?"
)
OPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.USub: operator.neg,
}


def calculate(expression: str) -> float:
    """Evaluate + - * / and parentheses over numbers; nothing else."""

    def ev(node: ast.AST) -> float:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in OPS:
            return OPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in OPS:
            return OPS[type(node.op)](ev(node.operand))
        raise ValueError(f"not arithmetic: {expression!r}")

    return ev(ast.parse(expression, mode="eval"))


with connect() as lip:
    lip.mkdir("agent", parents=True)
    kv = lip.kv(f"agent/{time.time_ns()}.kv", create=True)
    system = "You solve arithmetic word problems with a calculator tool."
    kv.append(
        lip.apply_chat_template(
            [{"role": "system", "content": system}, {"role": "user", "content": QUESTION}]
        )
    )
    opening = lip.tokenize("I will use the calculator: calc(")
    kv.append(opening[:-1])
    # the tool call's argument: only digits, operators, spaces and ')' may be generated
    allowed = sorted({t for ch in "0123456789+-*/(). " for t in lip.tokenize(ch)})
    close = lip.tokenize(")")[0]
    expression: list[int] = []
    pending = opening[-1]  # fed with the next forward, which returns what follows it
    for _ in range(24):
        token = kv.forward([pending], temperature=0.0, allowed=allowed).token
        if token == close and expression:
            break
        expression.append(token)
        pending = token
    text = lip.detokenize(expression).strip()
    try:
        value = calculate(text)
        result = int(value) if float(value).is_integer() else round(value, 6)
    except (ValueError, SyntaxError, ZeroDivisionError) as exc:
        result = f"error: {exc}"
    print(f"calc: {text} = {result}")
    kv.append(lip.tokenize(f") = {result}. So the answer is"))
    answer = kv.generate(max_tokens=24, temperature=0.0, stop=["\n"]).text
    print(f"answer: So the answer is{answer}")
    kv.unlink()
