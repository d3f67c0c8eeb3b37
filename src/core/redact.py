"""Credentials out of what is logged or printed: `scheme://user:pass@host` -> `scheme://user:***@host`.

A storage or tracking URL may carry a database password; MLflow params and tags, console lines
and error messages get the redacted form, and only the code that connects sees the real one.
"""
from __future__ import annotations

import re
from typing import Any

MASK = "***"

# userinfo with a password: up to the LAST '@' of the token, the way SQLAlchemy and urllib split it,
# so a password holding an unencoded '@' or '/' is masked whole (over-masking beats a leak).
_USERINFO = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^:/?#@\s'\"<>]*:)[^\s'\"<>]*@")
# ?password=... / &sslpassword=... / ;pwd=... in a query string
_QUERY = re.compile(r"(?P<head>[?&;][^=&#?;\s'\"<>]*(?:password|passwd|pwd)=)[^&#;\s'\"<>]*", re.IGNORECASE)


def redact_url(text: str) -> str:
    """`text` with every URL password replaced by ***; text without credentials comes back unchanged."""
    text = _USERINFO.sub(lambda m: f"{m['head']}{MASK}@", text)
    return _QUERY.sub(lambda m: f"{m['head']}{MASK}", text)


def redact_value(value: Any) -> Any:
    """A value as logged: strings redacted; other values kept, unless their text holds a credential."""
    if isinstance(value, str):
        return redact_url(value)
    if value is None:
        return None
    text = str(value)
    masked = redact_url(text)
    return value if masked == text else masked  # e.g. a list of URLs: its text is what MLflow stores


def redact_params(flat: dict[str, Any]) -> dict[str, Any]:
    """A flattened params dict (section.key -> value) safe to log as MLflow params or tags."""
    return {key: redact_value(value) for key, value in flat.items()}
