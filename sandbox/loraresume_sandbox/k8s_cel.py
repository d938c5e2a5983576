"""A small subset of CEL, enough for the `x-kubernetes-validations` rules CRDs usually carry.

Full CEL is out of scope. This evaluates: `self`/`oldSelf`, field selection, `has()`,
indexing, literals, `! && || == != < <= > >= + - * / % in`, `?:`, and the functions
`size`, `startsWith`, `endsWith`, `contains`, `matches`, `int`, `double`, `string`.
That covers immutability (`self == oldSelf`, `self.uri == oldSelf.uri`), presence
transitions (`has(self.a) == has(oldSelf.a)`) and exactly-one-of rules. Anything else
(macros such as `all`/`exists`, other functions) raises `CelUnsupported` when parsed;
the schema layer then skips that rule with a logged note.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

Node = tuple[Any, ...]


class CelUnsupported(Exception):
    """The rule uses CEL beyond this subset; it is skipped, not failed."""


class CelError(Exception):
    """A runtime error while evaluating (e.g. `no such key: x`): the rule fails, as in CEL."""


_TOKEN = re.compile(
    r"""\s*(?:
        (?P<num>\d+\.\d+(?:[eE][+-]?\d+)?|\d+[uU]?)
      | (?P<str>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")
      | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
      | (?P<op>==|!=|<=|>=|&&|\|\||[-+*/%<>!()\[\].,?:])
    )""",
    re.VERBOSE,
)
_FUNCTIONS = {"size", "startsWith", "endsWith", "contains", "matches", "int", "double", "string", "has"}


def _tokenize(text: str) -> list[tuple[str, Any]]:
    tokens: list[tuple[str, Any]] = []
    pos = 0
    text = text.strip()
    while pos < len(text):
        found = _TOKEN.match(text, pos)
        if not found or found.end() == pos:
            raise CelUnsupported(f"cannot tokenize at {text[pos:pos + 10]!r}")
        pos = found.end()
        if found.group("num") is not None:
            raw = found.group("num").rstrip("uU")
            tokens.append(("lit", float(raw) if "." in raw else int(raw)))
        elif found.group("str") is not None:
            raw = found.group("str")[1:-1]
            tokens.append(("lit", bytes(raw, "utf-8").decode("unicode_escape")))
        elif found.group("ident") is not None:
            word = found.group("ident")
            if word in ("true", "false"):
                tokens.append(("lit", word == "true"))
            elif word == "null":
                tokens.append(("lit", None))
            elif word == "in":
                tokens.append(("op", "in"))
            else:
                tokens.append(("ident", word))
        else:
            tokens.append(("op", found.group("op")))
    tokens.append(("end", None))
    return tokens


class _Parser:
    _BINARY = [("||",), ("&&",), ("==", "!=", "<", "<=", ">", ">=", "in"), ("+", "-"), ("*", "/", "%")]

    def __init__(self, text: str) -> None:
        self.tokens = _tokenize(text)
        self.pos = 0

    def peek(self) -> tuple[str, Any]:
        return self.tokens[self.pos]

    def take(self, kind: str, value: Any = None) -> Any:
        tok = self.tokens[self.pos]
        if tok[0] != kind or (value is not None and tok[1] != value):
            raise CelUnsupported(f"expected {value or kind}, got {tok[1]!r}")
        self.pos += 1
        return tok[1]

    def at_op(self, *ops: str) -> bool:
        kind, value = self.peek()
        return kind == "op" and value in ops

    def parse(self) -> Node:
        node = self.expr()
        self.take("end")
        return node

    def expr(self) -> Node:
        cond = self.binary(0)
        if self.at_op("?"):
            self.pos += 1
            then = self.expr()
            self.take("op", ":")
            return ("cond", cond, then, self.expr())
        return cond

    def binary(self, level: int) -> Node:
        if level == len(self._BINARY):
            return self.unary()
        left = self.binary(level + 1)
        while self.at_op(*self._BINARY[level]):
            op = self.take("op")
            left = ("binary", op, left, self.binary(level + 1))
        return left

    def unary(self) -> Node:
        if self.at_op("!", "-"):
            op = self.take("op")
            return ("unary", op, self.unary())
        return self.member()

    def args(self) -> list[Node]:
        self.take("op", "(")
        args: list[Node] = []
        while not self.at_op(")"):
            args.append(self.expr())
            if not self.at_op(")"):
                self.take("op", ",")
        self.take("op", ")")
        return args

    def member(self) -> Node:
        node = self.primary()
        while True:
            if self.at_op("."):
                self.pos += 1
                name = self.take("ident")
                if self.at_op("("):
                    if name not in _FUNCTIONS:
                        raise CelUnsupported(f"function or macro {name}() is not in the subset")
                    node = ("call", name, [node, *self.args()])
                else:
                    node = ("select", node, name)
            elif self.at_op("["):
                self.pos += 1
                index = self.expr()
                self.take("op", "]")
                node = ("index", node, index)
            else:
                return node

    def primary(self) -> Node:
        kind, value = self.peek()
        if kind == "lit":
            self.pos += 1
            return ("lit", value)
        if kind == "ident":
            self.pos += 1
            if self.at_op("("):
                if value not in _FUNCTIONS:
                    raise CelUnsupported(f"function {value}() is not in the subset")
                args = self.args()
                if value == "has":
                    if len(args) != 1 or args[0][0] != "select":
                        raise CelUnsupported("has() needs a field selection")
                    return ("has", args[0])
                return ("call", value, args)
            if value not in ("self", "oldSelf"):
                raise CelUnsupported(f"unknown identifier {value}")
            return ("ident", value)
        if self.at_op("("):
            self.pos += 1
            node = self.expr()
            self.take("op", ")")
            return node
        if self.at_op("["):
            self.pos += 1
            items: list[Node] = []
            while not self.at_op("]"):
                items.append(self.expr())
                if not self.at_op("]"):
                    self.take("op", ",")
            self.take("op", "]")
            return ("list", items)
        raise CelUnsupported(f"unexpected token {value!r}")


def _type_name(value: Any) -> str:
    return {bool: "bool", int: "int", float: "double", str: "string", list: "list", dict: "map"}.get(
        type(value), "null_type"
    )


def _call(name: str, args: list[Any]) -> Any:
    if name == "size" and len(args) == 1 and isinstance(args[0], (str, list, dict)):
        return len(args[0])
    if name in ("startsWith", "endsWith", "contains", "matches") and len(args) == 2:
        text, arg = args
        if not isinstance(text, str) or not isinstance(arg, str):
            raise CelError(f"no such overload: {_type_name(text)}.{name}({_type_name(arg)})")
        if name == "startsWith":
            return text.startswith(arg)
        if name == "endsWith":
            return text.endswith(arg)
        if name == "contains":
            return arg in text
        return re.search(arg, text) is not None
    if name == "int" and len(args) == 1:
        return int(args[0])
    if name == "double" and len(args) == 1:
        return float(args[0])
    if name == "string" and len(args) == 1:
        return (
            args[0] if isinstance(args[0], str) else str(args[0]).lower() if isinstance(args[0], bool) else str(args[0])
        )
    raise CelError(f"no such overload: {name}({', '.join(_type_name(a) for a in args)})")


_ARITH: dict[str, Callable[[Any, Any], Any]] = {
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b,
    "*": lambda a, b: a * b,
    "/": lambda a, b: a // b if isinstance(a, int) and isinstance(b, int) else a / b,
    "%": lambda a, b: a % b,
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
}


def _eval(node: Node, env: dict[str, Any]) -> Any:
    kind = node[0]
    if kind == "lit":
        return node[1]
    if kind == "ident":
        return env[node[1]]
    if kind == "select":
        target = _eval(node[1], env)
        if not isinstance(target, dict):
            raise CelError(f"no such key: {node[2]}")
        if node[2] not in target:
            raise CelError(f"no such key: {node[2]}")
        return target[node[2]]
    if kind == "has":
        target = _eval(node[1][1], env)
        return isinstance(target, dict) and node[1][2] in target
    if kind == "index":
        target, index = _eval(node[1], env), _eval(node[2], env)
        try:
            return target[index]
        except (KeyError, IndexError, TypeError) as exc:
            raise CelError(f"no such key: {index}") from exc
    if kind == "list":
        return [_eval(item, env) for item in node[1]]
    if kind == "call":
        return _call(node[1], [_eval(arg, env) for arg in node[2]])
    if kind == "cond":
        return _eval(node[2] if _bool(_eval(node[1], env)) else node[3], env)
    if kind == "unary":
        value = _eval(node[2], env)
        if node[1] == "!":
            return not _bool(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return -value
        raise CelError(f"no such overload: -{_type_name(value)}")
    op, left, right = node[1], node[2], node[3]
    if op in ("&&", "||"):
        return _logic(op, left, right, env)
    a, b = _eval(left, env), _eval(right, env)
    if op == "==":
        return a == b
    if op == "!=":
        return a != b
    if op == "in":
        if isinstance(b, (list, dict)):
            return a in b
        raise CelError(f"no such overload: {_type_name(a)} in {_type_name(b)}")
    try:
        return _ARITH[op](a, b)
    except (TypeError, ZeroDivisionError) as exc:
        raise CelError(f"no such overload: {_type_name(a)} {op} {_type_name(b)}") from exc


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise CelError(f"no such overload: expected bool, got {_type_name(value)}")
    return value


def _logic(op: str, left: Node, right: Node, env: dict[str, Any]) -> bool:
    """CEL's commutative && / ||: a decisive side wins even when the other side errs."""
    decisive = op == "||"
    errors: list[CelError] = []
    for side in (left, right):
        try:
            if _bool(_eval(side, env)) == decisive:
                return decisive
        except CelError as exc:
            errors.append(exc)
    if errors:
        raise errors[0]
    return not decisive


def compile_rule(rule: str) -> Node:
    """Parse a rule once; raises CelUnsupported for CEL outside the subset."""
    return _Parser(rule).parse()


def uses_old_self(node: Node) -> bool:
    if node[0] == "ident":
        return node[1] == "oldSelf"
    return any(uses_old_self(part) for part in node[1:] if isinstance(part, tuple)) or any(
        uses_old_self(item) for part in node[1:] if isinstance(part, list) for item in part
    )


def evaluate(node: Node, self_value: Any, old_self: Any = None) -> bool:
    """True when the rule holds; raises CelError on a runtime error (a failed rule)."""
    return _bool(_eval(node, {"self": self_value, "oldSelf": old_self}))
