"""EBNF grammars as SGLang's default grammar backend (xgrammar) reads them, and
a seeded string each one accepts: what a model constrained by `ebnf` writes.

The dialect is GBNF's: rules `name ::= expression`, the start rule `root`;
expressions of double-quoted strings (escapes `\\n \\t \\r \\\\ \\" \\xHH \\uHHHH`),
character classes (`[a-z0-9_]`, negated `[^"\\\\]`), rule names, groups
`( … )`, alternatives `|` and repetition `*`, `+`, `?`, `{n}`, `{n,}`, `{n,m}`;
`#` comments. A rule ends where the next `name ::=` begins.

A sample is a random derivation that stays short: repetitions take a few
items, and past a depth every choice takes the alternative with the shortest
derivation, so recursive rules end.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

# Repetitions without an upper bound take at most this many items beyond their minimum.
EXTRA_REPEATS = 3
# Past this depth a derivation takes its shortest way out.
MAX_DEPTH = 12
PRINTABLE = [chr(code) for code in range(0x20, 0x7F)]


class EbnfError(ValueError):
    """A grammar that does not parse, or that refers to a rule it lacks."""


@dataclass(frozen=True, slots=True)
class Literal:
    text: str


@dataclass(frozen=True, slots=True)
class CharClass:
    ranges: tuple[tuple[str, str], ...]
    negated: bool


@dataclass(frozen=True, slots=True)
class RuleRef:
    name: str


@dataclass(frozen=True, slots=True)
class Group:
    """Its items in sequence, or with `any_of` one of them."""
    items: tuple
    any_of: bool = False


@dataclass(frozen=True, slots=True)
class Repeat:
    item: object
    low: int
    high: int | None  # None: unbounded


_TOKEN = re.compile(r"""
    (?P<space>\s+|\#[^\n]*)
  | (?P<define>::=)
  | (?P<name>[A-Za-z_][A-Za-z0-9_.-]*)
  | (?P<string>"(?:[^"\\]|\\.)*")
  | (?P<cls>\[(?:[^\]\\]|\\.)*\])
  | (?P<bounds>\{\s*\d+\s*(?:,\s*\d*\s*)?\})
  | (?P<op>[|()*+?])
""", re.VERBOSE | re.DOTALL)

_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"', "'": "'", "[": "[", "]": "]", "-": "-",
            "^": "^", "/": "/", "b": "\b", "f": "\f", "0": "\0"}


def _unescape(body: str, where: str) -> list[str]:
    """The characters of a string or class body, escapes resolved."""
    chars, index = [], 0
    while index < len(body):
        char = body[index]
        if char != "\\":
            chars.append(char)
            index += 1
            continue
        code = body[index + 1:index + 2]
        if code in ("x", "u", "U"):
            width = {"x": 2, "u": 4, "U": 8}[code]
            digits = body[index + 2:index + 2 + width]
            if len(digits) != width or not all(d in "0123456789abcdefABCDEF" for d in digits):
                raise EbnfError(f"invalid escape \\{code}{digits} in {where}")
            chars.append(chr(int(digits, 16)))
            index += 2 + width
        elif code in _ESCAPES:
            chars.append(_ESCAPES[code])
            index += 2
        else:
            raise EbnfError(f"invalid escape \\{code} in {where}")
    return chars


def _tokens(grammar: str) -> list[tuple[str, str, int]]:
    tokens, position = [], 0
    while position < len(grammar):
        match = _TOKEN.match(grammar, position)
        if match is None:
            line = grammar.count("\n", 0, position) + 1
            raise EbnfError(f"unexpected {grammar[position]!r} at line {line}")
        if match.lastgroup != "space":
            tokens.append((match.lastgroup, match.group(), position))
        position = match.end()
    return tokens


class _Parser:
    def __init__(self, grammar: str) -> None:
        self.tokens = _tokens(grammar)
        self.index = 0

    def peek(self, offset: int = 0) -> tuple[str, str, int] | None:
        index = self.index + offset
        return self.tokens[index] if index < len(self.tokens) else None

    def rules(self) -> dict[str, object]:
        rules: dict[str, object] = {}
        while self.peek() is not None:
            kind, name, _ = self.peek()
            following = self.peek(1)
            if kind != "name" or following is None or following[0] != "define":
                raise EbnfError(f"expected a rule definition `name ::= …`, found {name!r}")
            if name in rules:
                raise EbnfError(f"rule {name!r} is defined more than once")
            self.index += 2
            rules[name] = self.choice()
        return rules

    def at_rule_start(self) -> bool:
        token, following = self.peek(), self.peek(1)
        return token is not None and token[0] == "name" and following is not None and following[0] == "define"

    def choice(self) -> object:
        options = [self.sequence()]
        while (token := self.peek()) is not None and token[1] == "|":
            self.index += 1
            options.append(self.sequence())
        return options[0] if len(options) == 1 else Group(tuple(options), any_of=True)

    def sequence(self) -> object:
        items = []
        while (token := self.peek()) is not None and token[1] not in ("|", ")") and not self.at_rule_start():
            items.append(self.postfix(self.primary()))
        if not items:
            raise EbnfError("an empty alternative (write \"\" for the empty string)")
        return items[0] if len(items) == 1 else Group(tuple(items))

    def primary(self) -> object:
        kind, text, _ = self.peek()
        self.index += 1
        if kind == "string":
            return Literal("".join(_unescape(text[1:-1], "a string")))
        if kind == "cls":
            return _char_class(text)
        if kind == "name":
            return RuleRef(text)
        if text == "(":
            inner = self.choice()
            closing = self.peek()
            if closing is None or closing[1] != ")":
                raise EbnfError("a group is not closed with `)`")
            self.index += 1
            return inner
        raise EbnfError(f"unexpected {text!r}")

    def postfix(self, item: object) -> object:
        while (token := self.peek()) is not None and (token[1] in ("*", "+", "?") or token[0] == "bounds"):
            self.index += 1
            if token[1] == "*":
                item = Repeat(item, 0, None)
            elif token[1] == "+":
                item = Repeat(item, 1, None)
            elif token[1] == "?":
                item = Repeat(item, 0, 1)
            else:
                low, _, high = token[1][1:-1].partition(",")
                low_count = int(low)
                high_count = low_count if "," not in token[1] else (int(high) if high.strip() else None)
                if high_count is not None and high_count < low_count:
                    raise EbnfError(f"repetition {token[1]} has its upper bound below its lower")
                item = Repeat(item, low_count, high_count)
        return item


def _char_class(text: str) -> CharClass:
    body = text[1:-1]
    negated = body.startswith("^")
    chars = _unescape(body[1:] if negated else body, "a character class")
    ranges, index = [], 0
    while index < len(chars):
        if index + 2 < len(chars) and chars[index + 1] == "-":
            if chars[index] > chars[index + 2]:
                raise EbnfError(f"range {chars[index]}-{chars[index + 2]} is reversed")
            ranges.append((chars[index], chars[index + 2]))
            index += 3
        else:
            ranges.append((chars[index], chars[index]))
            index += 1
    if not ranges and not negated:
        raise EbnfError("an empty character class")
    return CharClass(tuple(ranges), negated)


def parse(grammar: str) -> dict[str, object]:
    """The grammar's rules by name; raises EbnfError."""
    rules = _Parser(grammar).rules()
    if "root" not in rules:
        raise EbnfError('the root rule with name "root" is not found')

    def check(node: object) -> None:
        if isinstance(node, RuleRef) and node.name not in rules:
            raise EbnfError(f"rule {node.name!r} is not defined")
        for child in _children(node):
            check(child)

    for node in rules.values():
        check(node)
    return rules


def _children(node: object) -> tuple:
    if isinstance(node, Group):
        return node.items
    if isinstance(node, Repeat):
        return (node.item,)
    return ()


def _cost(node: object, rule_cost: dict[str, float]) -> float:
    """The length of the shortest string `node` derives, given the rules'."""
    if isinstance(node, Literal):
        return len(node.text)
    if isinstance(node, CharClass):
        return 1
    if isinstance(node, RuleRef):
        return rule_cost[node.name]
    if isinstance(node, Group):
        costs = [_cost(item, rule_cost) for item in node.items]
        return min(costs) if node.any_of else sum(costs)
    return node.low * _cost(node.item, rule_cost) if node.low else 0


def _shortest(rules: dict[str, object]) -> dict[str, float]:
    """The length of each rule's shortest derivation (a fixpoint; inf: none ends)."""
    cost = {name: float("inf") for name in rules}
    changed = True
    while changed:
        changed = False
        for name, node in rules.items():
            value = _cost(node, cost)
            if value < cost[name]:
                cost[name], changed = value, True
    if cost["root"] == float("inf"):
        raise EbnfError("the root rule derives no finite string")
    return cost


def sample(grammar: str, seed: int) -> str:
    """A string the grammar accepts, the same for the same seed; raises EbnfError."""
    rules = parse(grammar)
    shortest = _shortest(rules)
    rng = random.Random(seed)
    out: list[str] = []

    def cost(node: object) -> float:
        return _cost(node, shortest)

    def emit(node: object, depth: int) -> None:
        if isinstance(node, Literal):
            out.append(node.text)
        elif isinstance(node, CharClass):
            out.append(_class_char(node, rng))
        elif isinstance(node, RuleRef):
            emit(rules[node.name], depth + 1)
        elif isinstance(node, Group) and not node.any_of:
            for item in node.items:
                emit(item, depth)
        elif isinstance(node, Group):
            if depth < MAX_DEPTH:
                emit(rng.choice([option for option in node.items if cost(option) < float("inf")]), depth)
            else:
                emit(min(node.items, key=cost), depth)
        else:
            high = node.low + EXTRA_REPEATS if node.high is None else node.high
            count = node.low if depth >= MAX_DEPTH else rng.randint(node.low, high)
            for _ in range(count):
                emit(node.item, depth + 1)

    emit(rules["root"], 0)
    return "".join(out)


def _class_char(node: CharClass, rng: random.Random) -> str:
    def inside(char: str) -> bool:
        return any(low <= char <= high for low, high in node.ranges)

    if node.negated:
        allowed = [char for char in PRINTABLE if not inside(char)]
        if not allowed:
            raise EbnfError("a negated character class excludes every printable character")
        return rng.choice(allowed)
    low, high = rng.choice(node.ranges)
    return chr(rng.randint(ord(low), ord(high)))
