"""The string `format`s DotLLM enforces, each as a pattern (ECMA-262) both engines serve.

Each engine has its own idea of a format, and neither matched the format's definition:
outlines-core's `date-time` has no time zone (RFC 3339 needs one), its `time` lets a
backslash in, its `date` takes Unicode digits and February 31st, its `email` can close
the JSON string. So DotLLM writes each format it claims as one pattern, for both engines,
that only matches what `jsonschema`'s format checker accepts (`validation.py` checks the
same formats): dates that exist (leap years included, year 1 to 9999), RFC 3339 times
with a time zone, lower-case UUIDs, dotted-quad IPv4 without leading zeros, the full
eight-group IPv6 form, host names of at most four labels (253 characters), and
`http(s)`/`ftp` URIs on such hosts. These are subsets of the formats: every string they
allow is valid, not every valid string is allowed. Any other format is not enforced
(`enforcement.py` says so).
"""

from __future__ import annotations

_YEAR = r"(?:[0-9]{3}[1-9]|[0-9]{2}[1-9][0-9]|[0-9][1-9][0-9]{2}|[1-9][0-9]{3})"
_LEAP_YEAR = (r"(?:[0-9]{2}(?:0[48]|[2468][048]|[13579][26])"
              r"|(?:0[48]|[2468][048]|[13579][26])00)")
_MONTH_DAY = (r"(?:(?:0[13578]|1[02])-(?:0[1-9]|[12][0-9]|3[01])"
              r"|(?:0[469]|11)-(?:0[1-9]|[12][0-9]|30)"
              r"|02-(?:0[1-9]|1[0-9]|2[0-8]))")
DATE = rf"(?:{_YEAR}-{_MONTH_DAY}|{_LEAP_YEAR}-02-29)"
TIME = (r"(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\.[0-9]{1,9})?"
        r"(?:Z|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])")
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,60}[A-Za-z0-9])?"
HOSTNAME = rf"{_LABEL}(?:\.{_LABEL}){{0,3}}"
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
_PCHARS = r"[A-Za-z0-9._~!$&'()*+,;=:@-]"

PATTERNS: dict[str, str] = {
    "date": DATE,
    "time": TIME,
    "date-time": f"{DATE}T{TIME}",
    "uuid": r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
    "ipv4": rf"{_OCTET}(?:\.{_OCTET}){{3}}",
    "ipv6": r"[0-9a-f]{1,4}(?::[0-9a-f]{1,4}){7}",
    "hostname": HOSTNAME,
    "email": rf"[A-Za-z0-9._%+-]{{1,64}}@{HOSTNAME}",
    "uri": (rf"(?:https?|ftp)://{HOSTNAME}(?::[0-9]{{1,5}})?(?:/{_PCHARS}*)*"
            rf"(?:\?(?:{_PCHARS}|[/?])*)?(?:#(?:{_PCHARS}|[/?])*)?"),
}
ENFORCED = frozenset(PATTERNS)


def pattern_for(name: str) -> str | None:
    """The anchored pattern a string of format `name` must match, None if not enforced."""
    regex = PATTERNS.get(name)
    return None if regex is None else f"^{regex}$"
