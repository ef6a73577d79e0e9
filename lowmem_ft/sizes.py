"""Memory sizes as people write them (24GiB, 16GB, 512MiB) and as the tool prints them."""

from __future__ import annotations

import math
import re
from decimal import Decimal

from lowmem_ft.errors import UserError


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def format_bytes_up(n: float) -> str:
    """``n`` (>= 0) as ``format_bytes`` writes it, rounded up, not to the nearest: a shortfall said
    "needs 2.5 GiB more" must be met by 2.5 GiB more (2.52 GiB said 2.5 left the user 25 MiB short)."""
    return _format_bytes_rounded(n, math.ceil)


def format_bytes_down(n: float) -> str:
    """``n`` (>= 0) as ``format_bytes`` writes it, rounded down: a most ("give at most 23.4 GiB")."""
    return _format_bytes_rounded(n, math.floor)


def _format_bytes_rounded(n: float, rounding) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        shown = rounding(n) if unit == "B" else rounding(round(n * 10, 6)) / 10
        if shown < 1024 or unit == "TiB":
            return f"{shown:.0f} {unit}" if unit == "B" else f"{shown:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


# Decimal units (KB, MB, ...) are powers of 1000; binary ones (KiB, MiB, ...) powers of 1024. A bare
# letter (K, M, G, T) counts as binary: see parse_size.
_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kib": 1024,
    "kb": 1000,
    "m": 1024**2,
    "mib": 1024**2,
    "mb": 1000**2,
    "g": 1024**3,
    "gib": 1024**3,
    "gb": 1000**3,
    "t": 1024**4,
    "tib": 1024**4,
    "tb": 1000**4,
}

# A plain or decimal number with an optional short exponent (24, 1.5, .5, 24e9), then an optional unit.
# The exponent is limited to two digits so that "1e999999999" is an error, not a huge integer.
_SIZE_RE = re.compile(r"(\d+\.?\d*|\.\d+)(e[+-]?\d{1,2})?\s*([a-z]*)")


# More memory than any one machine has (1 EiB): a larger budget is a typo.
MOST_MEMORY = 1 << 60


def parse_size(text: str, flag: str, least: int = 1 << 20) -> int:
    """Parse a memory size from the command line into bytes.

    Accepts ``24GiB``, ``24 GiB``, ``1.5TiB``, ``512MiB`` (binary), ``24GB``, ``100KB`` (decimal),
    ``24e9`` or ``24000000000`` (bytes), with units in any case. A bare ``K``, ``M``, ``G`` or ``T``
    means KiB, MiB, GiB or TiB: someone who types ``24G`` for a "24 GB" card means the card's
    marketing size, and the memory NVIDIA reports for it is close to 24 GiB, not 24e9 bytes.

    ``flag`` names the option in the error message; ``least``: the smallest size that means
    something (a memory budget under a MiB does not: a unit, or its G, was left out).
    """
    match = _SIZE_RE.fullmatch(text.strip().lower().removeprefix("-"))
    if match is None or match.group(3) not in _UNITS:
        raise _not_a_size(text, flag)
    number, exponent, unit = match.groups()
    # Decimal keeps byte counts above 2**53 exact, where float would round them.
    value = Decimal(number + (exponent or "")) * _UNITS[unit]
    size = int(value.to_integral_value())
    if text.strip().startswith("-") and value != 0:
        raise UserError(f"{flag} {text!r} is negative; give the memory to plan for, like 24GiB")
    if size <= 0:
        raise UserError(f"{flag} {text!r} is less than a byte; give the memory to plan for, like 24GiB")
    if size > MOST_MEMORY:  # (a typo: 1e30 bytes printed as 909494701772928256.0 TiB)
        raise UserError(f"{flag} {text!r} is over 1 EiB, more than a machine holds; write it like 24GiB")
    if unit == "" and size < least:  # "--gpu-mem 24" is 24 bytes: a unit was left out
        raise UserError(
            f"{flag} {text!r} has no unit, so it means {size} bytes; write it like {text.strip()}GiB"
        )
    if size < least:  # "24B", "24KB": a G left out, most likely
        raise UserError(f"{flag} {text!r} is {size:,} bytes, less than a MiB; write it like 24GiB")
    return size


def _not_a_size(text: str, flag: str) -> UserError:
    return UserError(f"{flag} {text!r} is not a memory size; write it like 24GiB, 16GB or 512MiB")
