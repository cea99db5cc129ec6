"""Date and time formats that every common parser reads.

llguidance's ``date-time``, ``date`` and ``time`` formats follow RFC 3339's grammar loosely: a leap
second (``:60``) at any minute, year 0000, 29 February of any year, lowercase ``t``/``z``. Python's
``datetime``, Pydantic and the ``jsonschema`` format checker reject each of these, so a model that picks
one returns JSON its caller cannot load. Before compiling, a schema's string formats of these three kinds
become patterns for the strict subset: years 0001-9999, days that exist in their month (29 February in
leap years only), seconds 00-59, uppercase ``T`` and ``Z``. Every string these patterns accept is a valid
RFC 3339 value, so the constraint only narrows.
"""

from __future__ import annotations

from typing import Any

_YEAR = r"(?:[1-9][0-9]{3}|0[1-9][0-9]{2}|00[1-9][0-9]|000[1-9])"
_LEAP_YEAR = r"(?:[0-9]{2}(?:0[48]|[2468][048]|[13579][26])|(?:0[48]|[2468][048]|[13579][26])00)"
_MONTH_DAY = (r"(?:(?:0[1-9]|1[0-2])-(?:0[1-9]|1[0-9]|2[0-8])"  # every month has days 01-28
              r"|(?:0[13-9]|1[0-2])-(?:29|30)"  # all but February have 29 and 30
              r"|(?:0[13578]|1[02])-31)")  # the long months
_DATE = rf"(?:{_YEAR}-{_MONTH_DAY}|{_LEAP_YEAR}-02-29)"
_HOUR_MINUTE = r"(?:[01][0-9]|2[0-3]):[0-5][0-9]"
_TIME = rf"{_HOUR_MINUTE}:[0-5][0-9](?:\.[0-9]{{1,9}})?(?:Z|[+-]{_HOUR_MINUTE})"

PATTERNS = {"date-time": f"^{_DATE}T{_TIME}$", "date": f"^{_DATE}$", "time": f"^{_TIME}$"}

# keywords whose values are data, not subschemas: nothing under them is rewritten
_DATA_KEYWORDS = frozenset({"const", "enum", "default", "examples"})


def strict_formats(schema: Any) -> Any:
    """``schema`` with each string format of PATTERNS replaced by its pattern (a copy; the input is left as
    it is). A schema that already has a ``pattern`` keeps it and its format, as llguidance takes one or the
    other."""
    if isinstance(schema, list):
        return [strict_formats(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: value if key in _DATA_KEYWORDS else strict_formats(value) for key, value in schema.items()}
    fmt = out.get("format")
    if isinstance(fmt, str) and fmt in PATTERNS and "pattern" not in out:
        del out["format"]
        out["pattern"] = PATTERNS[fmt]
    return out
