"""ECMA-262 regular expressions, as JSON Schema defines `pattern`, in the syntax both engines
read (Rust's regex-syntax: outlines-core and llguidance alike).

Read as Rust reads them, `\\d` and `\\w` are Unicode classes and `.` takes `"`: a regex
`[a-z]{3}-\\d{4}` produced `kot-۰０೬૦`, and a `pattern` spliced into a JSON string could close
it. So DotLLM parses every pattern as ECMA-262 (with Annex B's lenient escapes and the
named groups and `\\A`/`\\z` anchors that Python and Rust users write) and writes it out
with explicit classes: `\\d` is `[0-9]`, `\\w` `[A-Za-z0-9_]`, `\\s` ECMA's whitespace, `.`
anything but a line terminator. What neither engine can match (look-arounds, back
references, word boundaries, inline flags, an anchor anywhere but at an edge) is an
`UnsupportedRegex` naming the feature.

Three ways to write one out (`Mode`):

- SEARCH: JSON Schema's meaning (a match anywhere; anchors kept), for llguidance, which
  searches too;
- FULL: the whole string matches (a `regex` constraint): anchors at the edges are
  dropped;
- JSON_BODY: FULL, written over the JSON text of a string's body, for outlines-core,
  which splices a pattern between two quotes: `"`, `\\` and control characters appear as
  their JSON escapes, never raw;
- SEARCH_AS_FULL: SEARCH for a `patternProperties` name in llguidance, which matches a
  name's JSON text, escapes and all (`"a\\"b"` matched `[^"]+`), and pads an unanchored
  pattern with a `.` that stops at a newline: each branch not anchored at an edge is
  padded with anything there, and neither the padding nor the pattern matches `"`, `\\`
  or a control character, so only names written without escapes match (a subset: the
  others are held to `additionalProperties`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from dotllm.compiler.errors import ConstraintError

MAX_CODE_POINT = 0x10FFFF
_SURROGATES = (0xD800, 0xDFFF)


class UnsupportedRegex(ConstraintError):
    """A valid pattern using a feature no engine here can match."""


class Mode(enum.Enum):
    SEARCH = "search"
    FULL = "full"
    JSON_BODY = "json_body"
    SEARCH_AS_FULL = "search_as_full"


Ranges = tuple[tuple[int, int], ...]


def _normalize(ranges) -> Ranges:
    out: list[list[int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return tuple((lo, hi) for lo, hi in out)


def _complement(ranges: Ranges) -> Ranges:
    out, start = [], 0
    for lo, hi in _normalize(ranges + (_SURROGATES,)):
        if lo > start:
            out.append((start, lo - 1))
        start = hi + 1
    if start <= MAX_CODE_POINT:
        out.append((start, MAX_CODE_POINT))
    return tuple(out)


def _subtract(ranges: Ranges, remove: Ranges) -> Ranges:
    keep = _complement(remove)
    out = []
    for lo, hi in ranges:
        for klo, khi in keep:
            if klo <= hi and lo <= khi:
                out.append((max(lo, klo), min(hi, khi)))
    return _normalize(out)


def _contains(ranges: Ranges, cp: int) -> bool:
    return any(lo <= cp <= hi for lo, hi in ranges)


DIGIT: Ranges = ((0x30, 0x39),)
WORD: Ranges = _normalize([(0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A)])
SPACE: Ranges = _normalize([(0x09, 0x0D), (0x20, 0x20), (0xA0, 0xA0), (0x1680, 0x1680),
                            (0x2000, 0x200A), (0x2028, 0x2029), (0x202F, 0x202F),
                            (0x205F, 0x205F), (0x3000, 0x3000), (0xFEFF, 0xFEFF)])
LINE_TERMINATORS: Ranges = ((0x0A, 0x0A), (0x0D, 0x0D), (0x2028, 0x2029))
# What a JSON string cannot hold raw: the quote, the backslash, control characters.
_JSON_SPECIAL: Ranges = ((0x00, 0x1F), (0x22, 0x22), (0x5C, 0x5C))
_CLASS_ESCAPES = {"d": DIGIT, "w": WORD, "s": SPACE}
_CHAR_ESCAPES = {"t": 0x09, "n": 0x0A, "v": 0x0B, "f": 0x0C, "r": 0x0D}


# The syntax tree: few node types, each written out by `_Writer`.
@dataclass(frozen=True)
class _Set:
    ranges: Ranges
    props: tuple[str, ...] = ()  # `\p{..}` / `\P{..}` items, kept as written
    negated: bool = False  # only with props: ranges are complemented eagerly otherwise


@dataclass(frozen=True)
class _Alt:
    branches: tuple


@dataclass(frozen=True)
class _Concat:
    items: tuple


@dataclass(frozen=True)
class _Repeat:
    item: object
    low: int
    high: int | None


@dataclass(frozen=True)
class _Anchor:
    start: bool  # `^` (True) or `$`


_EMPTY = _Concat(())


class _Parser:
    def __init__(self, pattern: str):
        self.p = pattern
        self.i = 0

    def error(self, message: str) -> ConstraintError:
        return ConstraintError(f"invalid regex {self.p!r} at {self.i}: {message}")

    def peek(self, n: int = 0) -> str:
        j = self.i + n
        return self.p[j] if j < len(self.p) else ""

    def take(self) -> str:
        c = self.peek()
        if not c:
            raise self.error("unexpected end")
        self.i += 1
        return c

    def parse(self):
        node = self.disjunction()
        if self.i < len(self.p):
            raise self.error("unbalanced ')'")
        return node

    def disjunction(self):
        branches = [self.alternative()]
        while self.peek() == "|":
            self.i += 1
            branches.append(self.alternative())
        return branches[0] if len(branches) == 1 else _Alt(tuple(branches))

    def alternative(self):
        items = []
        while self.peek() and self.peek() not in "|)":
            atom = self.atom()
            items.append(self.quantified(atom))
        return items[0] if len(items) == 1 else _Concat(tuple(items))

    def quantified(self, atom):
        c = self.peek()
        if c in ("*", "+", "?"):
            self.i += 1
            low, high = {"*": (0, None), "+": (1, None), "?": (0, 1)}[c]
        elif c == "{" and (bounds := self.counted()) is not None:
            low, high = bounds
        else:
            return atom
        if isinstance(atom, _Anchor):
            raise self.error("nothing to repeat")
        if self.peek() == "?":  # lazy: the same language
            self.i += 1
        if self.peek() in ("*", "+", "?") or (self.peek() == "{" and self._is_counted()):
            raise self.error("nothing to repeat")
        return _Repeat(atom, low, high)

    def _is_counted(self) -> bool:
        start = self.i
        try:
            return self.counted() is not None
        finally:
            self.i = start

    def counted(self) -> tuple[int, int | None] | None:
        """`{n}`, `{n,}`, `{n,m}`; None (nothing consumed) for a literal `{` (Annex B)."""
        start, self.i = self.i, self.i + 1
        low = self.number()
        high: int | None = low
        if low is not None and self.peek() == ",":
            self.i += 1
            high = self.number()
        if low is None or self.peek() != "}":
            self.i = start
            return None
        self.i += 1
        if high is not None and high < low:
            raise self.error("numbers out of order in {} quantifier")
        return low, high

    def number(self) -> int | None:
        start = self.i
        while self.peek().isdigit() and self.peek().isascii():
            self.i += 1
        return int(self.p[start:self.i]) if self.i > start else None

    def atom(self):
        c = self.take()
        if c == "^":
            return _Anchor(True)
        if c == "$":
            return _Anchor(False)
        if c == ".":
            return _Set(_complement(LINE_TERMINATORS))
        if c == "(":
            return self.group()
        if c == "[":
            return self.char_class()
        if c == "\\":
            return self.atom_escape()
        if c in "*+?":
            raise self.error("nothing to repeat")
        if c == "{" and self._is_counted_after_brace():
            raise self.error("nothing to repeat")
        return _Set(((ord(c), ord(c)),))

    def _is_counted_after_brace(self) -> bool:
        self.i -= 1
        try:
            return self._is_counted()
        finally:
            self.i += 1

    def group(self):
        if self.peek() == "?":
            rest = self.p[self.i + 1:self.i + 3]
            if rest[:1] in ("=", "!") or rest in ("<=", "<!"):
                raise UnsupportedRegex(f"regex {self.p!r} uses a look-around, which no "
                                       "engine here can match")
            if rest[:1] == ":":
                self.i += 2
            elif rest[:1] == "<" or rest == "P<":
                end = self.p.find(">", self.i)
                if end < 0:
                    raise self.error("unterminated group name")
                self.i = end + 1
            else:
                raise UnsupportedRegex(f"regex {self.p!r} uses an inline flag or group "
                                       "form that JSON Schema's regexes do not have")
        node = self.disjunction()
        if self.peek() != ")":
            raise self.error("missing )")
        self.i += 1
        return node

    def atom_escape(self):
        c = self.take()
        if c in "bB":
            raise UnsupportedRegex(f"regex {self.p!r} uses a word boundary (\\{c}), which no "
                                   "engine here can match")
        if c == "A":
            return _Anchor(True)
        if c in "zZ":
            return _Anchor(False)
        if c == "k" or (c.isdigit() and c != "0"):
            raise UnsupportedRegex(f"regex {self.p!r} uses a back reference, which no engine "
                                   "here can match")
        self.i -= 1
        return self.class_escape(in_class=False)

    def class_escape(self, in_class: bool) -> _Set:
        c = self.take()
        if c.lower() in _CLASS_ESCAPES:
            ranges = _CLASS_ESCAPES[c.lower()]
            return _Set(ranges if c.islower() else _complement(ranges))
        if c in "pP" and self.peek() == "{":
            end = self.p.find("}", self.i)
            if end < 0:
                raise self.error("unterminated \\p{")
            prop = self.p[self.i + 1:end]
            self.i = end + 1
            return _Set((), (f"\\{c}{{{prop}}}",))
        return _char(self.char_escape(c, in_class))

    def char_escape(self, c: str, in_class: bool) -> int:
        if c in _CHAR_ESCAPES:
            return _CHAR_ESCAPES[c]
        if c == "b" and in_class:
            return 0x08
        if c == "0" and not self.peek().isdigit():
            return 0
        if c == "c" and self.peek().isascii() and self.peek().isalpha():
            return ord(self.take()) % 32
        if c == "x" and _is_hex(self.p[self.i:self.i + 2], 2):
            self.i += 2
            return int(self.p[self.i - 2:self.i], 16)
        if c == "u":
            return self.unicode_escape()
        return ord(c)  # an identity escape: `\.`, `\-`, `\/`, ...

    def unicode_escape(self) -> int:
        if self.peek() == "{":
            end = self.p.find("}", self.i)
            digits = self.p[self.i + 1:end] if end > 0 else ""
            if not digits or not _is_hex(digits, len(digits)) or int(digits, 16) > MAX_CODE_POINT:
                raise self.error("invalid \\u{...} escape")
            self.i = end + 1
            return int(digits, 16)
        if not _is_hex(self.p[self.i:self.i + 4], 4):
            return ord("u")  # Annex B: `\u` not followed by four hex digits is a `u`
        cp = int(self.p[self.i:self.i + 4], 16)
        self.i += 4
        low = self.p[self.i + 2:self.i + 6]
        if 0xD800 <= cp <= 0xDBFF and self.p[self.i:self.i + 2] == "\\u" and _is_hex(low, 4) \
                and 0xDC00 <= int(low, 16) <= 0xDFFF:  # a surrogate pair: one code point
            self.i += 6
            return 0x10000 + ((cp - 0xD800) << 10) + (int(low, 16) - 0xDC00)
        if _SURROGATES[0] <= cp <= _SURROGATES[1]:
            raise UnsupportedRegex(f"regex {self.p!r} matches a lone surrogate, which no "
                                   "JSON text here can hold")
        return cp

    def char_class(self) -> _Set:
        negated = self.peek() == "^"
        if negated:
            self.i += 1
        ranges: list[tuple[int, int]] = []
        props: list[str] = []
        while True:
            c = self.take()
            if c == "]":
                break
            low = self.class_atom(c)
            if self.peek() == "-" and self.peek(1) not in ("]", ""):
                self.i += 1
                high = self.class_atom(self.take())
                if isinstance(low, int) and isinstance(high, int):
                    if high < low:
                        raise self.error("range out of order in character class")
                    ranges.append((low, high))
                    continue
                # Annex B: a class escape beside `-` makes the `-` a literal
                ranges.append((0x2D, 0x2D))
                for item in (low, high):
                    _add_class_item(item, ranges, props)
                continue
            _add_class_item(low, ranges, props)
        union = _normalize(ranges)
        if props:
            return _Set(union, tuple(props), negated)
        return _Set(_complement(union) if negated else union)

    def class_atom(self, c: str) -> int | _Set:
        if c != "\\":
            return ord(c)
        c = self.take()
        if c.lower() in _CLASS_ESCAPES or (c in "pP" and self.peek() == "{"):
            self.i -= 1
            return self.class_escape(in_class=True)
        return self.char_escape(c, in_class=True)


def _is_hex(text: str, n: int) -> bool:
    return len(text) == n and all(c in "0123456789abcdefABCDEF" for c in text)


def _char(cp: int) -> _Set:
    return _Set(((cp, cp),))


def _add_class_item(item: int | _Set, ranges: list, props: list) -> None:
    if isinstance(item, int):
        ranges.append((item, item))
    else:
        ranges.extend(item.ranges)
        props.extend(item.props)


_RUST_META = set("\\.+*?()|[]{}^$#&-~ ")


def _rust_char(cp: int) -> str:
    c = chr(cp)
    if c in _RUST_META:
        return "\\" + c if c != " " else "\\x20"
    if cp < 0x20 or cp > 0x7E:  # the regex stays printable ASCII, whatever it matches
        return f"\\x{{{cp:X}}}"
    return c


def _json_escape(cp: int) -> str:
    """The regex for the JSON escape of a character a JSON string cannot hold raw."""
    short = {0x22: '\\\\"', 0x5C: "\\\\\\\\", 0x08: "\\\\b", 0x0C: "\\\\f", 0x0A: "\\\\n",
             0x0D: "\\\\r", 0x09: "\\\\t"}
    return short.get(cp, f"\\\\u00{cp:02x}")


class _Writer:
    def __init__(self, source: str, mode: Mode):
        self.source = source
        self.mode = mode

    def write(self, node, at_start: bool, at_end: bool) -> str:
        if isinstance(node, _Set):
            return self.set(node)
        if isinstance(node, _Anchor):
            return self.anchor(node, at_start, at_end)
        if isinstance(node, _Alt):
            return "|".join(self.write(b, at_start, at_end) for b in node.branches)
        if isinstance(node, _Repeat):
            inner = self.write(node.item, False, False)
            if not (isinstance(node.item, _Set) and not inner.startswith("(")):
                inner = f"(?:{inner})"
            if (node.low, node.high) == (0, None):
                return inner + "*"
            if (node.low, node.high) == (1, None):
                return inner + "+"
            if (node.low, node.high) == (0, 1):
                return inner + "?"
            if node.high == node.low:
                return f"{inner}{{{node.low}}}"
            return f"{inner}{{{node.low},{'' if node.high is None else node.high}}}"
        parts, items = [], node.items
        # An item is at the start while everything before it matches nothing (anchors).
        for i, item in enumerate(items):
            starts = at_start and all(isinstance(x, _Anchor) for x in items[:i])
            ends = at_end and all(isinstance(x, _Anchor) for x in items[i + 1:])
            text = self.write(item, starts, ends)
            parts.append(f"(?:{text})" if isinstance(item, _Alt) else text)
        return "".join(parts)

    def anchor(self, node: _Anchor, at_start: bool, at_end: bool) -> str:
        if (node.start and at_start) or (not node.start and at_end):
            if self.mode is Mode.SEARCH:
                return "^" if node.start else "$"
            return ""  # the whole string matches anyway
        raise UnsupportedRegex(f"regex {self.source!r} has an anchor ({'^' if node.start else '$'})"
                               " inside it, which a whole-string match cannot honour")

    def set(self, node: _Set) -> str:
        ranges, escapes = node.ranges, []
        if self.mode is Mode.JSON_BODY and not node.props:
            # The quote and the backslash appear escaped; control characters too where
            # the set holds nothing else (`\n`), and are left out of wider sets.
            specials = [cp for cp in (0x22, 0x5C) if _contains(ranges, cp)]
            if not _subtract(ranges, _JSON_SPECIAL):
                specials = [cp for lo, hi in ranges for cp in range(lo, hi + 1)]
            escapes = [_json_escape(cp) for cp in specials]
        no_specials = self.mode in (Mode.JSON_BODY, Mode.SEARCH_AS_FULL)
        if no_specials and not node.negated:
            ranges = _subtract(ranges, _JSON_SPECIAL)
        body = self.class_body(ranges, node.props)
        if node.negated:
            text = f"[^{body}]"
            if no_specials:
                text = f"[{text}--[{self.class_body(_JSON_SPECIAL, ())}]]" if body else ""
        elif len(ranges) == 1 and ranges[0][0] == ranges[0][1] and not node.props:
            text = _rust_char(ranges[0][0])
        elif body:
            text = f"[{body}]"
        else:
            text = ""
        alternatives = ([text] if text else []) + escapes
        if not alternatives:
            return "[^\\x{0}-\\x{10FFFF}]"  # matches nothing, like ECMA's `[]`
        return alternatives[0] if len(alternatives) == 1 else f"(?:{'|'.join(alternatives)})"

    @staticmethod
    def class_body(ranges: Ranges, props: tuple[str, ...]) -> str:
        items = [_rust_char(lo) if lo == hi else f"{_rust_char(lo)}-{_rust_char(hi)}"
                 for lo, hi in ranges]
        return "".join(items) + "".join(props)


def parse(pattern: str):
    """The syntax tree of an ECMA-262 pattern (ConstraintError if it is not one)."""
    if not isinstance(pattern, str):
        raise ConstraintError("a regex must be a string")
    return _Parser(pattern).parse()


_ANYTHING = f"[{_Writer.class_body(_complement(_JSON_SPECIAL), ())}]*"


def translate(pattern: str, mode: Mode) -> str:
    """`pattern` (ECMA-262) in Rust regex syntax, written for `mode`."""
    node = parse(pattern)
    if mode is Mode.SEARCH_AS_FULL:
        branches = node.branches if isinstance(node, _Alt) else (node,)
        return "|".join(_search_as_full(pattern, b) for b in branches)
    text = _Writer(pattern, mode).write(node, True, True)
    return f"(?:{text})" if isinstance(node, _Alt) else text


def _search_as_full(source: str, branch) -> str:
    items = branch.items if isinstance(branch, _Concat) else (branch,)
    starts = bool(items) and items[0] == _Anchor(True)
    ends = bool(items) and items[-1] == _Anchor(False)
    items = list(items[int(starts):len(items) - int(ends)])
    # Found anywhere, `x{1,255}` is found where `x` is: at an unanchored edge a repeat
    # needs only its least count (the padding takes the rest). Padded as it stands, it
    # made llguidance's lexer give up ("too many expressions constructed").
    for edge, anchored in ((-1, ends), (0, starts)):
        while items and not anchored and isinstance(items[edge], _Repeat):
            least = items[edge]
            if least.low == 0:
                del items[edge]
            else:
                items[edge] = _Repeat(least.item, least.low, least.low)
                break
    inner = _Concat(tuple(items))
    # Anchors elsewhere (inside a group) cannot be honoured once padded.
    body = _Writer(source, Mode.SEARCH_AS_FULL).write(inner, False, False)
    return f"{'^' if starts else _ANYTHING}(?:{body}){'$' if ends else _ANYTHING}"
