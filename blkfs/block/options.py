"""Node options: the three spellings people use, and the schemas drivers declare.

Ground rules (docs/design.md, "Options"):

* Every spelling parses to one nested dict of plain values: ``driver=qcow2,file.filename=/a``
  (dotted keys, ``,,`` for a literal comma), JSON (``{"driver": "qcow2", ...}``), or a path
  alone (``/img/a.qcow2``: file protocol, format probed when the tree is opened), optionally
  followed by dotted options for the top node (``/img/cd.iso,read-only=on``).
* A driver declares its options as :class:`Option` values keyed by dotted name (``*`` stands
  for a list index, as in ``inject-error.*.event``) and its children by role. Validation turns
  the raw dict into typed values; an unknown, missing or ill-typed option raises
  :class:`~blkfs.errors.OptionError` naming the option and the driver, before anything opens.

Everything here is a function of values: no files, no trio.
"""

from __future__ import annotations

import difflib
import errno
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Literal
from urllib.parse import parse_qs, unquote, urlsplit

from blkfs.block.perm import FILTERED, Role
from blkfs.errors import OptionError

OptionType = Literal["str", "int", "size", "bool", "enum", "float", "duration", "errno"]
Tree = dict[str, Any]

REQUIRED: Any = object()
"""Default of an option the user must give."""

_SIZE_SUFFIXES = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "m": 1 << 20,
    "g": 1 << 30,
    "t": 1 << 40,
    "p": 1 << 50,
    "e": 1 << 60,
}
_NODE_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")
_SIZE_RE = re.compile(r"^(\d+(?:\.\d+)?)([bkmgtpe]?)$", re.IGNORECASE)
"""QEMU's sizes (qemu_strtosz): a number and one optional binary suffix, nothing else."""
_SIZE_HELP = "must be a size such as 65536, 64k, 10M or 2G (one suffix of B, K, M, G, T, P, E)"
_TRUE = {"on", "true", "yes", "1"}
_FALSE = {"off", "false", "no", "0"}
_MAX_DEPTH = 16


@dataclass(frozen=True)
class Option:
    """One declared option: its type, its default (``REQUIRED`` if none) and a help line."""

    type: OptionType
    default: Any = None
    help: str = ""
    choices: tuple[str, ...] = ()
    minimum: int | float | None = None

    def parse(self, driver: str, name: str, raw: Any) -> Any:
        """Return the typed value of ``raw`` or raise OptionError naming ``name`` and ``driver``."""
        try:
            value: Any = _CONVERTERS[self.type](raw, self)
        except (ValueError, TypeError) as exc:
            raise OptionError(f"{driver}: option '{name}' {exc} (got {raw!r})") from None
        if self.minimum is not None and value < self.minimum:
            raise OptionError(
                f"{driver}: option '{name}' must be at least {self.minimum} (got {raw!r})"
            )
        return value


def _to_str(raw: Any, opt: Option) -> str:
    if not isinstance(raw, str):
        raise TypeError("must be a string")
    return raw


def _to_int(raw: Any, opt: Option) -> int:
    if isinstance(raw, bool) or not isinstance(raw, (int, str)):
        raise TypeError("must be an integer")
    try:
        return int(raw, 0) if isinstance(raw, str) else raw
    except ValueError:
        raise ValueError("must be an integer") from None


def _to_float(raw: Any, opt: Option) -> float:
    if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
        raise TypeError("must be a number")
    try:
        return float(raw)
    except ValueError:
        raise ValueError("must be a number") from None


def parse_size(raw: Any) -> int:
    """Bytes from an int or a string with an optional binary suffix (``512``, ``64k``, ``10M``),
    as QEMU spells them: ``10MB``, ``10Mb`` and ``10 M`` are refused, not taken for 10 MiB."""
    if isinstance(raw, bool) or not isinstance(raw, (int, str)):
        raise TypeError(_SIZE_HELP)
    if isinstance(raw, int):
        if raw < 0:
            raise ValueError("must not be negative")
        return raw
    match = _SIZE_RE.match(raw)
    if not match:
        raise ValueError(_SIZE_HELP)
    number, suffix = match.groups()
    if len(number) > 40:  # far beyond 2**64 already; spares int() a huge string
        raise ValueError("is too large")
    value = Fraction(number) * _SIZE_SUFFIXES[suffix.lower()]  # exact, unlike float
    if value >= 1 << 64:
        raise ValueError("is too large")
    if value.denominator != 1:
        raise ValueError("must be a whole number of bytes")
    return int(value)


def _to_size(raw: Any, opt: Option) -> int:
    return parse_size(raw)


def parse_bool(raw: Any) -> bool:
    """on/off, true/false, yes/no, 1/0, or a JSON boolean."""
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and raw.lower() in _TRUE | _FALSE:
        return raw.lower() in _TRUE
    raise ValueError("must be on or off")


def _to_bool(raw: Any, opt: Option) -> bool:
    return parse_bool(raw)


def _to_enum(raw: Any, opt: Option) -> str:
    if raw not in opt.choices:
        raise ValueError("must be one of " + ", ".join(opt.choices))
    return str(raw)


_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|us)?\s*$")
_DURATION_UNITS = {None: 1.0, "s": 1.0, "ms": 1e-3, "us": 1e-6}


def _to_duration(raw: Any, opt: Option) -> float:
    """Seconds from a number or a string with a unit (``0.5``, ``10ms``, ``2s``)."""
    if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
        raise TypeError("must be a duration such as 10ms, 0.5s or 2")
    if isinstance(raw, str):
        match = _DURATION_RE.match(raw)
        if not match:
            raise ValueError("must be a duration such as 10ms, 0.5s or 2")
        return float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    if raw < 0:
        raise ValueError("must not be negative")
    return float(raw)


def _to_errno(raw: Any, opt: Option) -> int:
    """An errno by number or by name (``5``, ``EIO``, ``enospc``)."""
    if isinstance(raw, str) and not raw.strip().lstrip("-").isdigit():
        name = raw.strip().upper()
        if name not in _ERRNO_NAMES:
            close = closest(name, list(_ERRNO_NAMES))
            raise ValueError(
                "is an unknown errno name" + (f" (did you mean {close}?)" if close else "")
            )
        return _ERRNO_NAMES[name]
    value = _to_int(raw, opt)
    if value not in errno.errorcode:
        raise ValueError("must be an errno such as EIO, ENOSPC or 5")
    return value


_ERRNO_NAMES = {name: number for number, name in errno.errorcode.items()}


_CONVERTERS = {
    "str": _to_str,
    "int": _to_int,
    "size": _to_size,
    "bool": _to_bool,
    "enum": _to_enum,
    "float": _to_float,
    "duration": _to_duration,
    "errno": _to_errno,
}


@dataclass(frozen=True)
class ChildSpec:
    """A child a driver takes, by name. ``auto`` children are opened by the layer before the
    driver's ``open``; the others (such as qcow2's ``backing``, which defaults to what the
    image header names) are handed to the driver raw, to open itself. ``role`` says what
    the child is to the driver, and so which permissions the driver needs of it."""

    required: bool = True
    auto: bool = True
    help: str = ""
    role: Role = FILTERED


COMMON_OPTIONS: Mapping[str, Option] = {
    "driver": Option("str", None, "the block driver of this node"),
    "node-name": Option("str", None, "a unique name for this node (generated if absent)"),
    "read-only": Option("bool", False, "open the node read-only"),
    "force-share": Option(
        "bool",
        False,
        "let others write the image while this read-only "
        "node reads it (QEMU's force-share, qemu-img -U)",
    ),
    "detect-zeroes": Option(
        "enum", "off", "turn all-zero writes into write_zeroes", choices=("off", "on", "unmap")
    ),
    "discard": Option(
        "enum",
        "unmap",
        "pass discard requests down (unmap) or drop them",
        choices=("ignore", "unmap"),
    ),
    "cache.no-flush": Option(
        "bool",
        False,
        "flushes write back what is cached but ask no host to make it durable (QEMU's "
        "cache.no-flush, its cache=unsafe; the children inherit it): for copies that are "
        "thrown away after a host crash",
    ),
}


# -- parsing -----------------------------------------------------------------------------


def parse_options(text: str) -> Tree:
    """Parse any of the three spellings into a nested dict; raise OptionError if malformed.
    A path that is an NBD URI (``nbd://HOST[:PORT]/EXPORT``,
    ``nbd+unix:///EXPORT?socket=PATH``; ``nbds`` and ``nbds+unix`` with ``tls-creds``)
    means an ``nbd`` node, and one that starts with ``rbd:`` an ``rbd`` node
    (:func:`rbd_filename`), as in QEMU."""
    text = text.strip()
    if not text:
        raise OptionError("no options given: expected a path, key=value pairs or JSON")
    if text.startswith("{"):
        return _parse_json(text)
    items = _split_commas(text)
    head, rest = items[0], items[1:]
    if _NBD_URI_RE.match(head):
        return _nbd_uri(head, _nest(_pairs(rest)))
    if head.startswith(RBD_PREFIX):
        return {**rbd_filename(head), **_nest(_pairs(rest))}
    if "=" in head:
        return _nest(_pairs(items))
    tree = _nest(_pairs(rest))
    if "file" in tree or "driver" in tree:
        raise OptionError(
            f"a path shorthand ('{head}') cannot be combined with 'file' or 'driver' options"
        )
    tree["file"] = {"driver": "file", "filename": head}
    return tree


_NBD_URI_RE = re.compile(r"^nbds?(\+tcp|\+unix)?://", re.IGNORECASE)


def nbd_uri(text: str) -> Tree | None:
    """The nbd node an NBD URI names, options and all (None if ``text`` is no NBD URI):
    for names found in images, such as a qcow2's backing file, where no options may follow
    (a comma is part of the URI, never the start of options an image could smuggle in)."""
    return _nbd_uri(text, {}) if _NBD_URI_RE.match(text) else None


def _nbd_uri(uri: str, tree: Tree) -> Tree:
    """The nbd node a URI names (QEMU's spelling), with the options after it."""
    if {"driver", "server", "export"} & set(tree):
        raise OptionError(f"an NBD URI ('{uri}') names the driver, server and export itself")
    try:
        parts = urlsplit(uri)
        port = parts.port
    except ValueError as exc:
        raise OptionError(f"invalid NBD URI '{uri}': {exc}") from None
    query = parse_qs(parts.query, keep_blank_values=True)
    export = unquote(parts.path[1:])
    scheme = parts.scheme.lower()
    if scheme.startswith("nbds") and "tls-creds" not in tree:
        raise OptionError(
            f"NBD URI '{uri}' asks for TLS: give tls-creds=DIR after it "
            "(ca-cert.pem, and client-cert.pem/client-key.pem if the server checks clients)"
        )
    if scheme.endswith("+unix"):
        if parts.netloc or set(query) != {"socket"} or len(query["socket"]) != 1:
            raise OptionError(f"invalid NBD URI '{uri}': expected {scheme}:///EXPORT?socket=PATH")
        server = {"type": "unix", "path": query["socket"][0]}
    else:
        if not parts.hostname or query:
            raise OptionError(f"invalid NBD URI '{uri}': expected {scheme}://HOST[:PORT]/EXPORT")
        server = {"type": "inet", "host": parts.hostname}
        if port is not None:
            server["port"] = str(port)
    return {"driver": "nbd", "server": server, "export": export, **tree}


RBD_PREFIX = "rbd:"
_RBD_KEYS = {"conf": "conf", "id": "user"}
"""The ``:key=value`` settings of an rbd filename, and the options they stand for."""


def rbd_filename(name: str) -> Tree:
    """The rbd node ``rbd:POOL[/NAMESPACE]/IMAGE[@SNAP][:conf=PATH][:id=USER]`` names
    (QEMU's qemu_rbd_parse_filename); a backslash takes the next character literally."""
    spec, rest = _rbd_token(name[len(RBD_PREFIX) :], ":")
    pool, image = _rbd_token(spec, "/")
    if image is None or not pool:
        raise OptionError(f"invalid rbd name '{name}': expected rbd:POOL/IMAGE")
    image, snapshot = _rbd_token(image, "@")
    tree: Tree = {"driver": "rbd", "pool": _unescape(pool)}
    namespace, image_rest = _rbd_token(image, "/")
    if image_rest is not None:
        tree["namespace"] = _unescape(namespace)
        image = image_rest
    tree["image"] = _unescape(image)
    if not tree["image"]:
        raise OptionError(f"invalid rbd name '{name}': the image name is empty")
    if snapshot is not None:
        tree["snapshot"] = _unescape(snapshot)
    while rest is not None:
        pair, rest = _rbd_token(rest, ":")
        key, eq, value = _unescape(pair).partition("=")
        if key not in _RBD_KEYS or not eq:
            raise OptionError(
                f"invalid rbd name '{name}': '{_unescape(pair)}' is not conf=PATH or id=USER"
            )
        tree[_RBD_KEYS[key]] = value
    return tree


def _rbd_token(text: str, sep: str) -> tuple[str, str | None]:
    """The text before the first unescaped ``sep`` and the text after it (None: no ``sep``)."""
    i = 0
    while i < len(text):
        if text[i] == "\\":
            i += 2
            continue
        if text[i] == sep:
            return text[:i], text[i + 1 :]
        i += 1
    return text, None


def _unescape(text: str) -> str:
    return re.sub(r"\\(.?)", r"\1", text, flags=re.DOTALL)


def _parse_json(text: str) -> Tree:
    try:
        value = json.loads(text)
    except RecursionError:
        raise OptionError("JSON options are nested too deeply") from None
    except ValueError as exc:
        raise OptionError(f"invalid JSON options: {exc}") from None
    if not isinstance(value, dict):
        raise OptionError("JSON options must be an object")
    tree: Tree = _normalize(value, 0)
    return tree


def _normalize(value: Any, depth: int) -> Any:
    """Lists become index-keyed dicts (``inject-error.0``); depth is bounded for hostile input."""
    if depth > _MAX_DEPTH:
        raise OptionError(f"options are nested deeper than {_MAX_DEPTH} levels")
    if isinstance(value, list):
        value = {str(i): item for i, item in enumerate(value)}
    if isinstance(value, dict):
        return {str(k): _normalize(v, depth + 1) for k, v in value.items()}
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _split_commas(text: str) -> list[str]:
    """Split on single commas; ``,,`` stands for a literal comma (QEMU's escaping)."""
    items, current, i = [], [], 0
    while i < len(text):
        if text[i] == ",":
            if text[i + 1 : i + 2] == ",":
                current.append(",")
                i += 2
                continue
            items.append("".join(current))
            current = []
        else:
            current.append(text[i])
        i += 1
    items.append("".join(current))
    return items


def _pairs(items: list[str]) -> list[tuple[str, str]]:
    pairs = []
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise OptionError(f"expected key=value, got '{item}'")
        pairs.append((key, value))
    return pairs


def _nest(pairs: list[tuple[str, str]]) -> Tree:
    tree: Tree = {}
    for key, value in pairs:
        parts = key.split(".")
        if len(parts) > _MAX_DEPTH or any(not p for p in parts):
            raise OptionError(f"invalid option name '{key}'")
        node = tree
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise OptionError(f"option '{key}' conflicts with a value given for '{part}'")
            node = child
        if parts[-1] in node:
            raise OptionError(f"option '{key}' is given twice")
        node[parts[-1]] = value
    return tree


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """The dotted-key view of a nested dict (the inverse of what dotted parsing builds)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def format_options(tree: Mapping[str, Any]) -> str:
    """Dotted spelling of a tree, for status output and logs."""
    return ",".join(f"{k}={_format_value(v)}" for k, v in flatten(tree).items())


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return "null" if value is None else str(value).replace(",", ",,")


# -- validation --------------------------------------------------------------------------


@dataclass
class Validated:
    """A node's options after validation: typed values by dotted name, children raw."""

    values: dict[str, Any]
    children: dict[str, Any] = field(default_factory=dict)


def _match(declared: Mapping[str, Option], name: str) -> Option | None:
    if name in declared:
        return declared[name]
    parts = name.split(".")
    for pattern, opt in declared.items():
        pat = pattern.split(".")
        if (
            "*" in pat
            and len(pat) == len(parts)
            and all(p == q or (p == "*" and q.isdigit()) for p, q in zip(pat, parts, strict=True))
        ):
            return opt
    return None


def closest(name: str, known: list[str]) -> str | None:
    """The known name ``name`` is most likely a typo of: the same letters swapped
    (``read-onyl``, ``EOI``), else the most similar one, if any is similar enough."""
    swapped = [k for k in known if len(k) == len(name) and sorted(k) == sorted(name)]
    if swapped:
        return swapped[0]
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.7)
    return close[0] if close else None


def unknown_option(name: str, known: list[str]) -> str:
    """The sentence for an option nobody declares, with the closest known name if any."""
    close = closest(name, known)
    hint = f"did you mean '{close}'? " if close else ""
    return f"unknown option '{name}' ({hint}known: {', '.join(sorted(known))})"


def list_options(declared: Mapping[str, Option]) -> set[str]:
    """The names of a schema's list options (``inject-error`` for ``inject-error.*.event``)."""
    return {name.split(".*", 1)[0] for name in declared if ".*" in name}


def validate(
    driver: str,
    declared: Mapping[str, Option],
    roles: Mapping[str, ChildSpec],
    tree: Mapping[str, Any],
    partial: bool = False,
) -> Validated:
    """Type-check ``tree`` against a driver's schema; raise OptionError on the first fault.
    ``partial`` (for reopen) checks only what is given: no defaults, nothing required.
    A list option given as ``none`` (or an empty JSON list) is an empty list."""
    schema = {**COMMON_OPTIONS, **declared}
    lists = list_options(declared)
    result = Validated(values={})
    for key, raw in tree.items():
        if key in lists and raw in ("none", {}):
            continue
        if key in roles:
            if raw is not None and not isinstance(raw, (dict, str)):
                raise OptionError(
                    f"{driver}: child '{key}' must be options or a node name (got {raw!r})"
                )
            # "null" is how the dotted syntax (and status output) spells JSON's null
            result.children[key] = None if raw == "null" else raw
            continue
        flat = flatten({key: raw}) if isinstance(raw, dict) else {key: raw}
        for name, value in flat.items():
            opt = _match(schema, name)
            if opt is None:
                raise OptionError(f"{driver}: {unknown_option(name, [*schema, *roles])}")
            result.values[name] = opt.parse(driver, name, value)
    node_name = result.values.get("node-name")
    if node_name is not None and (not _NODE_NAME_RE.match(node_name) or node_name == "null"):
        raise OptionError(
            f"{driver}: node-name {node_name!r} is invalid (a letter, then up "
            "to 63 letters, digits, '-', '.' or '_'; 'null' means no child)"
        )
    if partial:
        return result
    for name, opt in schema.items():
        if "*" in name or name in result.values:
            continue
        if opt.default is REQUIRED:
            raise OptionError(f"{driver}: option '{name}' is required ({opt.help})")
        result.values[name] = opt.default
    for role, spec in roles.items():
        if spec.required and spec.auto and role not in result.children:
            raise OptionError(f"{driver}: child '{role}' is required ({spec.help})")
    return result
