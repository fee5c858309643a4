"""Reading what a file says without trusting it: bounded JSON, checked fields, safe text.

Every reader (safetensors headers, shard indexes, ``config.json``, FP8 layer
configs, GGUF headers) goes through these helpers, so the rules live in one
place:

* **JSON is bounded before it is parsed.**  Counting a header's structural
  bytes (``{``, ``[``, ``,``) bounds how many objects ``json.loads`` can
  build, so a 100 MB header of millions of empty entries is refused in
  milliseconds instead of growing memory for seconds.  Integers of more than
  a few dozen digits, NaN/Infinity, duplicate keys and nesting deeper than a
  real file has are refused while parsing.
* **Fields are checked for type and range** (``field_int``, ``field_bool``
  ...) so that a ``num_layers`` of ``"3"`` or ``[3]`` is one clear error
  instead of a ``TypeError`` far away.
* **Text from a file is shown safely** (``shown``): escaped, one line, and
  short, so a tensor name cannot break the terminal or the one-line error
  convention.  Strings that are not valid Unicode (lone surrogates, which
  JSON's ``\\ud800`` escapes can produce) are refused at read time
  (``check_text``), so no later message or writer trips over them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from qconvert.core.errors import CheckpointError

# Digits in any integer a header may hold: byte offsets and dimensions fit in
# 20 digits (2^64); a number longer than this is an attack on int() (Python
# refuses more than 4300 digits with a ValueError) or on our arithmetic.
MAX_INT_DIGITS = 24
# Real headers nest three deep ({name: {"shape": [..]}}); config files a little more.
MAX_JSON_DEPTH = 16


@dataclass(frozen=True)
class Limits:
    """How much structure one JSON document may have (see ``load_json``)."""

    objects: int  # '{' and '[' together
    items: int  # ',' (every value after the first in a container)


def shown(value: Any, limit: int = 120) -> str:
    """``value`` as it is safe to print: escaped (no control characters, no
    lone surrogates), on one line, at most about ``limit`` characters."""
    text = value if isinstance(value, str) else _brief_repr(value, limit)
    if not text.isprintable() or not text.isascii():
        text = "".join(ch if ch.isprintable() and not 0xD800 <= ord(ch) <= 0xDFFF else
                       ch.encode("unicode_escape", "backslashreplace").decode("ascii")
                       for ch in text[: limit + 1])
    if len(text) > limit:
        text = text[:limit] + f"...({len(value) if isinstance(value, str) else '?'} chars)"
    return text


def _brief_repr(value: Any, limit: int) -> str:
    """A short repr that never recurses into a deep structure."""
    if isinstance(value, (list, tuple, dict)):
        kind = type(value).__name__
        if len(value) > 8 or any(isinstance(v, (list, tuple, dict)) for v in
                                 (value.values() if isinstance(value, dict) else value)):
            return f"<a {kind} of {len(value)} items>"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 10 ** MAX_INT_DIGITS:
        return f"<an integer of more than {MAX_INT_DIGITS} digits>"
    try:
        return repr(value)[: limit + 1]
    except (RecursionError, ValueError):
        return f"<a {type(value).__name__}>"


def unicode_text(text: str) -> str:
    """``text`` as valid Unicode: bytes of a file-system name that are not UTF-8
    (surrogate escapes in Python) become ``\\xNN``, any other lone surrogate ``\\udNNN``."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")


def path_text(path: Any) -> str:
    """A path as valid Unicode, for metadata, reports and the terminal (see ``unicode_text``)."""
    return unicode_text(os.fspath(path))


def type_name(value: Any) -> str:
    """What a JSON value is, in a user's words."""
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "an object", type(None): "null"}.get(type(value), type(value).__name__)


def check_text(text: str, where: str, what: str = "name") -> str:
    """Refuse strings that cannot be written as UTF-8 (lone surrogates)."""
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise CheckpointError(f"{where}: {what} {shown(text)} is not valid Unicode (a lone surrogate); "
                                  "the file is corrupt") from None
    return text


def load_json(raw: bytes | str, where: str, limits: Limits) -> Any:
    """Parse untrusted JSON within ``limits``; any problem is one ``CheckpointError`` naming ``where``."""
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else bytes(raw)
    objects = data.count(b"{") + data.count(b"[")
    if objects > limits.objects:
        raise CheckpointError(f"{where}: {objects:,} JSON objects/lists, more than the {limits.objects:,} "
                              "a file of this kind can have; the file is corrupt or hostile")
    items = data.count(b",")
    if items > limits.items:
        raise CheckpointError(f"{where}: {items:,} JSON items, more than the {limits.items:,} "
                              "a file of this kind can have; the file is corrupt or hostile")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{where}: not UTF-8 text ({exc.reason} at byte {exc.start}); "
                              "the file is corrupt") from None
    try:
        value = json.loads(text, parse_int=_parse_int, parse_constant=_parse_constant,
                           object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{where}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}); "
                              "the file is corrupt") from None
    except RecursionError:
        raise CheckpointError(f"{where}: JSON nested too deeply; the file is corrupt or hostile") from None
    except _BadJson as exc:
        raise CheckpointError(f"{where}: {exc}; the file is corrupt or hostile") from None
    _check_tree(value, where)
    return value


class _BadJson(ValueError):
    pass


def _parse_int(digits: str) -> int:
    if len(digits.lstrip("-")) > MAX_INT_DIGITS:
        raise _BadJson(f"an integer of {len(digits):,} digits")
    return int(digits)


def _parse_constant(name: str):
    raise _BadJson(f"{name} is not a JSON number")


def _unique_keys(pairs: list) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise _BadJson(f"key {shown(dup)} appears twice (readers would disagree on which one counts)")
    return out


def _check_tree(value: Any, where: str) -> None:
    """Nesting depth and text, for every key and string (iterative: no recursion to exhaust).

    A lone surrogate anywhere (``"\\ud800"``) is refused, not only in the
    fields qconvert reads: the safetensors library refuses the whole header.
    """
    stack = [(value, 1, "")]  # value, depth, the key it sits under
    while stack:
        v, depth, under = stack.pop()
        if isinstance(v, str):
            check_text(v, where, f"the value of {shown(under)}" if under else "a string")
        elif isinstance(v, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                raise CheckpointError(f"{where}: JSON nested more than {MAX_JSON_DEPTH} deep; "
                                      "the file is corrupt or hostile")
            if isinstance(v, dict):
                for k in v:
                    check_text(k, where, "the key")
                stack.extend((c, depth + 1, k) for k, c in v.items())
            else:
                stack.extend((c, depth + 1, under) for c in v)


# ---------------------------------------------------------------- fields

def field_int(obj: dict, key: str, where: str, *, low: int, high: int, default: Any = ...) -> int:
    """``obj[key]`` as an int in [low, high] (a JSON boolean is not an int)."""
    if key not in obj:
        if default is ...:
            raise CheckpointError(f"{where}: {key} is missing")
        return default
    value = obj[key]
    if not isinstance(value, int) or isinstance(value, bool):
        raise CheckpointError(f"{where}: {key} must be an integer, not {type_name(value)} ({shown(value, 40)})")
    if not low <= value <= high:
        raise CheckpointError(f"{where}: {key} is {shown(value, 40)}; it must be between {low:,} and {high:,}")
    return value


def field_bool(obj: dict, key: str, where: str, *, default: bool) -> bool:
    value = obj.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise CheckpointError(f"{where}: {key} must be true or false, not {type_name(value)} ({shown(value, 40)})")
    return value


def field_str(obj: dict, key: str, where: str, *, default: Any = ...) -> str:
    if key not in obj:
        if default is ...:
            raise CheckpointError(f"{where}: {key} is missing")
        return default
    value = obj[key]
    if not isinstance(value, str):
        raise CheckpointError(f"{where}: {key} must be a string, not {type_name(value)} ({shown(value, 40)})")
    return check_text(value, where, key)
