"""Bytes from a peer, decoded: the one error every refusal raises (DecodeError), and the bounded JSON parser that
every decoder of peer bytes shares.

A decoder of peer bytes is total: for any input it returns a value or raises DecodeError, never RecursionError,
MemoryError, OverflowError or a library's internal error, so that hostile bytes are refused and never kill the
process that received them. Standard library only and outside the layers (iota.model may import nothing else of
iota), so every package raises and catches this one type.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

MAX_JSON_NUMBER_CHARS = 32
"""The longest JSON number accepted: 2**64 has 20 digits and a float's shortest repr at most 24 characters, while
Python's int() of thousands of digits is slow and raises past 4,300 (a ValueError that is no DecodeError)."""


class DecodeError(ValueError):
    """Bytes from a peer that are not what the receiver expects: wrong format, size, shape, type or value.

    A ValueError, so callers that already refuse an input on ValueError (the miner's hop, the audit's judge) refuse
    these too, and nothing that catches it needs to import this module."""


# A JSON string, closing quote optional: possessive, so a match never backtracks, and an unterminated string is
# consumed to the end at once (json.loads refuses it later): the scan stays linear on any input.
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*+"?', re.DOTALL)
_NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"[]{}")))
_EMPTY_PAIR = re.compile(rb"\[\]|\{\}")


def load_json(raw: bytes | bytearray | memoryview | str, *, max_bytes: int, max_depth: int, what: str) -> Any:
    """JSON from a peer, or DecodeError: at most `max_bytes` of UTF-8, nested at most `max_depth` deep (a scalar
    is depth 0, `[1]` depth 1), no duplicate keys in an object, numbers finite and at most
    MAX_JSON_NUMBER_CHARS long. `what` names the input in the error.

    The depth is checked on the bytes before json.loads sees them: its recursion on 2,000 nested brackets raises
    RecursionError, which no caller expects."""
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else bytes(raw)
    if len(data) > max_bytes:
        raise DecodeError(f"{what}: {len(data)} bytes of JSON, more than the {max_bytes} allowed")
    if _depth_exceeds(data, max_depth):
        raise DecodeError(f"{what}: JSON nested deeper than {max_depth} levels, or unbalanced brackets")
    try:
        text = data.decode("utf-8")
        return json.loads(
            text,
            object_pairs_hook=_no_duplicate_keys,
            parse_int=_int,
            parse_float=_float,
            parse_constant=_no_constant,
        )
    except DecodeError as error:
        raise DecodeError(f"{what}: {error}") from None
    except ValueError as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise DecodeError(f"{what}: not valid JSON ({error})") from None


def _depth_exceeds(data: bytes, max_depth: int) -> bool:
    """Whether the brackets outside strings nest deeper than `max_depth` or do not pair up, in C-speed passes:
    strings removed, then everything but brackets, then innermost empty pairs, one nesting level per pass."""
    brackets = _STRING.sub(b"", data).translate(None, _NOT_BRACKETS)
    for _ in range(max_depth):
        if not brackets:
            return False
        brackets, removed = _EMPTY_PAIR.subn(b"", brackets)
        if not removed:
            return True  # "[}" or "[" alone: never balanced
    return bool(brackets)


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Two entries under one key would let a sender show one check one value and the next another.
    keys = [key for key, _ in pairs]
    if len(keys) != len(set(keys)):
        raise DecodeError(f"duplicate keys in a JSON object: {sorted(set(keys))[:8]}")
    return dict(pairs)


def _int(literal: str) -> int:
    return int(_short(literal))


def _float(literal: str) -> float:
    value = float(_short(literal))
    if not math.isfinite(value):
        raise DecodeError(f"JSON number {literal} is not a finite float")
    return value


def _short(literal: str) -> str:
    if len(literal) > MAX_JSON_NUMBER_CHARS:
        raise DecodeError(f"a JSON number of {len(literal)} characters")
    return literal


def _no_constant(name: str) -> Any:
    raise DecodeError(f"JSON constant {name} (NaN and Infinity are not JSON numbers)")
