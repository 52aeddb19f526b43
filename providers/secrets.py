"""Keeping credentials out of messages, log lines and reprs.

Every message built from an upstream body or a URL passes `redact` (the provider's key and
any URL password) before it is logged, raised or returned; URLs are shown through `mask_url`.
A value shorter than `MIN_SECRET_CHARS` is never treated as a secret: replacing a one-letter
"key" everywhere would mangle every message and hide nothing.
"""

from __future__ import annotations

import base64
from urllib.parse import unquote, urlsplit, urlunsplit

from pydantic import SecretStr

MIN_SECRET_CHARS = 8
MASK = "***"


def _value(secret: SecretStr | str | None) -> str:
    value = secret.get_secret_value() if isinstance(secret, SecretStr) else secret or ""
    return value if len(value) >= MIN_SECRET_CHARS else ""


def redact(text: str, *secrets: SecretStr | str | None) -> str:
    """`text` with every secret in it replaced by `***`."""
    for value in sorted(filter(None, map(_value, secrets)), key=len, reverse=True):
        text = text.replace(value, MASK)
    return text


def split_credentials(url: str) -> tuple[str, str | None, str | None]:
    """`url` without its `user:password@` part, the password, and the Basic authorization
    header value that carries them (Nones without one): sent as a header, the password never
    shows in a URL that httpx or a proxy logs."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url, None, None
    if "@" not in parts.netloc:
        return url, None, None
    userinfo, _, host = parts.netloc.rpartition("@")
    userinfo = unquote(userinfo)
    header = f"Basic {base64.b64encode(userinfo.encode()).decode()}"
    return urlunsplit(parts._replace(netloc=host)), userinfo.partition(":")[2], header


def mask_url(url: str) -> str:
    """`url` with any `user:password@` part shown as `***@`."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return MASK
    if "@" not in parts.netloc:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{MASK}@{host}"))
