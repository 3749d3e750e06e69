"""Checking a ``[delivery.NAME]`` table against a sink's ``OPTIONS``.

``OPTIONS`` maps each key (besides ``kind``) to its default; the default's
type is the key's type, and a default of ``None`` makes the key required
(a string).  Errors are ``ValueError`` with one line naming the key.
"""

import math
import os

_TYPE_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}


def typed(options, spec):
    """``options`` completed with the defaults of ``spec``, type-checked."""
    unknown = sorted(set(options) - set(spec) - {"kind"})
    if unknown:
        raise ValueError(f"unknown key {unknown[0]} (known: {', '.join(sorted(spec))})")
    out = {}
    for key, default in spec.items():
        if key not in options:
            if default is None:
                raise ValueError(f"{key}: required")
            out[key] = default
            continue
        value = options[key]
        expected = str if default is None else type(default)
        ok = isinstance(value, expected) and not (
            expected is not bool and isinstance(value, bool)
        )
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if expected is float and ok and not math.isfinite(value):
            ok = False
        if not ok:
            raise ValueError(f"{key}: expected {_TYPE_NAMES[expected]}, got {type(value).__name__}")
        out[key] = value
    return out


def one_of(key, value, allowed):
    if value not in allowed:
        raise ValueError(
            f"{key}: must be one of " + ", ".join(f'"{a}"' for a in allowed) + f", got {value!r}"
        )


def resolve_path(value, base_dir):
    """``value`` relative to ``base_dir`` (``""`` stays ``""``)."""
    if not value:
        return value
    return os.path.normpath(os.path.join(os.path.abspath(base_dir or "."), os.path.expanduser(value)))


def read_secret_file(key, path):
    """The stripped text of a secret file; ``ValueError`` naming ``key``
    (never the content) when it cannot be read or is empty."""
    try:
        with open(path, "rb") as f:
            text = f.read().strip()
    except OSError as e:
        raise ValueError(f"{key}: cannot read {path}: {e.strerror}") from None
    if not text:
        raise ValueError(f"{key}: {path} is empty")
    try:
        return text.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{key}: {path} is not UTF-8 text") from None
