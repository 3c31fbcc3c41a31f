"""Memory sizes as people type them: ``16GB``, ``16GiB``, ``24g``, ``1.5TiB``, ``8000000000``.

The rule, documented once (and echoed by every command that reads a size):

- ``GB``, ``MB``, ``TB``, ``KB`` (with the ``B``) are decimal: ``16GB`` = 16 x 10^9 bytes, the
  unit in which GPU and laptop makers print their memory.
- ``GiB``, ``MiB``, ``TiB``, ``KiB`` are binary: ``16GiB`` = 16 x 2^30 bytes.
- A bare letter, ``g``/``G``, ``m``/``M``, ``t``/``T``, ``k``/``K`` (no ``B``), is binary, as
  in ``docker run --memory 24g`` and ``java -Xmx24g``: ``24g`` = 24 GiB.
- A plain number is bytes.

No torch here: this module is on the path of `recommend` and `validate`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from ehrplan.errors import UsageError

KIB, MIB, GIB, TIB = 1024, 1024**2, 1024**3, 1024**4
MAX_BYTES = 2**63  # a size beyond it is a typo (and overflows the estimator's integers)

# unit (lower-cased) -> (bytes per unit, canonical name, binary?)
_UNITS: dict[str, tuple[int, str, bool]] = {
    "": (1, "bytes", False),
    "b": (1, "bytes", False),
    "kb": (10**3, "KB", False),
    "mb": (10**6, "MB", False),
    "gb": (10**9, "GB", False),
    "tb": (10**12, "TB", False),
    "kib": (KIB, "KiB", True),
    "mib": (MIB, "MiB", True),
    "gib": (GIB, "GiB", True),
    "tib": (TIB, "TiB", True),
    "k": (KIB, "KiB", True),
    "m": (MIB, "MiB", True),
    "g": (GIB, "GiB", True),
    "t": (TIB, "TiB", True),
}

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*([a-zA-Z]*)\s*$")


@dataclass(frozen=True)
class Size:
    """A parsed memory size: the bytes, and how the text was read (for the output to say)."""

    text: str
    bytes: int
    unit: str
    binary: bool

    @property
    def reading(self) -> str:
        """E.g. ``"24g" read as 24 GiB (binary: 1 GiB = 1024^3 bytes) = 25,769,803,776 bytes``."""
        if self.unit == "bytes":
            return f"'{self.text}' read as {self.bytes:,} bytes"
        kind = "binary: 1 {u} = 1024^{p} bytes" if self.binary else "decimal: 1 {u} = 10^{q} bytes"
        power = {"KiB": 1, "MiB": 2, "GiB": 3, "TiB": 4}.get(self.unit, 0)
        dec = {"KB": 3, "MB": 6, "GB": 9, "TB": 12}.get(self.unit, 0)
        number = _SIZE.match(self.text).group(1)  # type: ignore[union-attr]
        return (
            f"'{self.text}' read as {number} {self.unit} "
            f"({kind.format(u=self.unit, p=power, q=dec)}) = {self.bytes:,} bytes"
        )


def parse_size(text: str) -> Size:
    """Parse ``16GB`` (10^9), ``16GiB`` (2^30), ``24g`` (GiB) or a byte count; one-line errors."""
    m = _SIZE.match(text or "")
    if not m:
        raise UsageError(
            f"cannot read the size '{(text or '')[:40]}': write a number and a unit, e.g. 16GB "
            "(10^9 bytes), 16GiB (2^30 bytes) or 24g (GiB)"
        )
    number, unit = m.group(1), m.group(2).lower()
    if unit not in _UNITS:
        valid = "B, KB, MB, GB, TB, KiB, MiB, GiB, TiB, k, m, g, t"
        raise UsageError(f"unknown unit '{m.group(2)}' in size '{text}' (valid units: {valid})")
    scale, name, binary = _UNITS[unit]
    value = float(number) * scale
    if not math.isfinite(value) or value > MAX_BYTES:
        raise UsageError(f"the size '{text[:40]}' is too large (at most 2^63 bytes, 8 EiB)")
    n = round(value)
    if n <= 0:
        raise UsageError(f"the size '{text}' must be more than zero bytes")
    return Size(text=text.strip(), bytes=n, unit=name, binary=binary)


def fmt_bytes(n: float | None) -> str:
    """Human-readable bytes in binary units (MiB below 1 GiB, GiB above)."""
    if n is None:
        return "-"
    if abs(n) >= GIB:
        return f"{n / GIB:,.2f} GiB"
    return f"{n / MIB:,.1f} MiB"


def fmt_count(n: int) -> str:
    """An integer with thousands separators and its size in millions."""
    return f"{n:,} ({n / 1e6:.2f} M)"
