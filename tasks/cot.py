"""Chain-of-thought targets written from SVAMP's equations, in one short, consistent style:
one line per operation, innermost first, then the answer line.

    "( ( 76.0 - 25.0 ) * 3.0 )"  ->  "76 - 25 = 51.\\n51 * 3 = 153.\\nThe answer is 153."

Each line is one "group" of Algorithm 1 (the hybrid loop cuts chain-of-thought at newlines).
"""

from __future__ import annotations

import operator
import re

ANSWER_PREFIX = "The answer is"
COT_INSTRUCTION = "Let's think step by step."
_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}
_TOKEN = re.compile(r"\d+(?:\.\d+)?|[-+*/()]")


def fmt(x: float) -> str:
    """A number as a person writes it: 51, 2.5, 0.33 (at most two decimals)."""
    if abs(x - round(x)) < 1e-9:
        return str(int(round(x)))
    return f"{x:.2f}".rstrip("0").rstrip(".")


def _parse(tokens: list[str], i: int, ops: list[tuple[str, str, str, str]]) -> tuple[float, int]:
    """Evaluate the expression at tokens[i:]; appends (op, x, y, result) per operation, innermost first."""
    tok = tokens[i]
    if tok != "(":
        return float(tok), i + 1
    left, i = _parse(tokens, i + 1, ops)
    if tokens[i] == ")":  # a parenthesised single number
        return left, i + 1
    op = tokens[i]
    right, i = _parse(tokens, i + 1, ops)
    if tokens[i] != ")":
        raise ValueError(f"expected ')' at token {i}")
    value = _OPS[op](left, right)
    ops.append((op, fmt(left), fmt(right), fmt(value)))
    return value, i + 1


def equation_ops(equation: str) -> tuple[list[tuple[str, str, str, str]], float]:
    """((op, x, y, result) per operation in solving order, the value) of an SVAMP equation;
    ValueError if malformed."""
    tokens = _TOKEN.findall(equation)
    if "".join(tokens) != re.sub(r"\s+", "", equation):
        raise ValueError(f"unexpected characters in equation {equation!r}")
    ops: list[tuple[str, str, str, str]] = []
    try:
        value, end = _parse(tokens, 0, ops)
    except (IndexError, KeyError, ZeroDivisionError) as e:
        raise ValueError(f"malformed equation {equation!r}") from e
    if end != len(tokens):
        raise ValueError(f"trailing tokens in equation {equation!r}")
    return ops, value


def equation_steps(equation: str) -> tuple[list[str], float]:
    """(one line per operation, the value) of an SVAMP equation."""
    ops, value = equation_ops(equation)
    return [f"{x} {op} {y} = {r}." for op, x, y, r in ops], value


def cot_target(equation: str, answer: float) -> str:
    """The chain-of-thought a model is taught to write for this problem."""
    lines, value = equation_steps(equation)
    if abs(value - answer) > 1e-6:
        raise ValueError(f"equation {equation!r} gives {value}, not the answer {answer}")
    return "\n".join(lines + [f"{ANSWER_PREFIX} {fmt(answer)}."])


def cot_prompt(question: str) -> str:
    """The user turn that asks for chain-of-thought (the hybrid loop's CoT stage writes the same)."""
    return f"{question}\n{COT_INSTRUCTION}"


# The memory model's extractive condensation keeps this many of the CoT's last equations
# (memory_model.data.reference_condensation): a later loop's prompt holds at most these.
KNOWN_EQUATIONS = 2


KNOWN = " Known: "  # between the question and its known results in a condensed prompt


def with_known(question: str, lines: list[str], keep: int = KNOWN_EQUATIONS) -> str:
    """A condensed prompt in the memory model's format: the question, then the last `keep`
    reasoning lines as known results ("Q Known: 76 - 25 = 51; 51 * 3 = 153.")."""
    eqs = [line.rstrip(".") for line in lines[-keep:]] if keep else []
    return f"{question}{KNOWN}{'; '.join(eqs)}." if eqs else question


def split_known(prompt: str) -> tuple[str, str]:
    """A condensed prompt's question and its known results (empty for a plain question)."""
    question, _, known = prompt.partition(KNOWN)
    return question, known


def continuation_targets(question: str, equation: str, answer: float) -> list[tuple[str, str]]:
    """(prompt, reply) pairs for a later loop of the hybrid loop: the question with its first j
    steps known, as the memory model writes it, and the rest of the chain-of-thought as the
    reply (j = all steps: the reply is the answer line alone). Teaches the large model to go on
    from a condensed prompt instead of starting the reasoning over."""
    lines = cot_target(equation, answer).split("\n")
    steps, answer_line = lines[:-1], lines[-1]
    return [(with_known(question, steps[:j]), "\n".join(steps[j:] + [answer_line]))
            for j in range(1, len(steps) + 1)]
