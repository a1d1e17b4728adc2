"""ISO-8601 durations as NVCF uses them (`PT10S`, `PT1H`)."""

from __future__ import annotations

import re

_DURATION = re.compile(
    r"^P(?:(?P<days>\d+(?:\.\d+)?)D)?(?:T(?:(?P<hours>\d+(?:\.\d+)?)H)?(?:(?P<minutes>\d+(?:\.\d+)?)M)?"
    r"(?:(?P<seconds>\d+(?:\.\d+)?)S)?)?$"
)


def parse_iso_duration(text: str | None, default: float | None = None) -> float:
    """Return the seconds of an ISO-8601 duration such as `PT10S`; raise ValueError if malformed."""
    if text is None:
        if default is None:
            raise ValueError("missing duration")
        return default
    match = _DURATION.match(text.strip().upper())
    if match is None or text.strip().upper() in ("P", "PT"):
        raise ValueError(f"'{text}' is not an ISO-8601 duration such as PT10S")
    parts = {k: float(v) for k, v in match.groupdict().items() if v is not None}
    return (
        parts.get("days", 0.0) * 86400
        + parts.get("hours", 0.0) * 3600
        + parts.get("minutes", 0.0) * 60
        + parts.get("seconds", 0.0)
    )
