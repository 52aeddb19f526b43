"""Keeping credentials out of messages, log lines and reprs.

Every message built from an upstream body or a URL passes `redact` (the provider's key and
any URL password) before it is logged, raised or returned, and before it is cut to a length
(`excerpt`): a cut key is no longer recognisable, so its head would leak. URLs are shown
through `mask_url`. A value of at least `MIN_SECRET_CHARS` is masked wherever it occurs; a
shorter one only where it is a whole token (not inside a longer word), so a one-letter "key"
does not mangle every message yet still never shows on its own.
"""

from __future__ import annotations

import base64
import re
from urllib.parse import unquote, urlsplit, urlunsplit

from pydantic import SecretStr

MIN_SECRET_CHARS = 8
MASK = "***"
Secrets = tuple[SecretStr | str | None, ...]
"""The values `redact` removes: keys, URL passwords, extra header values."""


def _value(secret: SecretStr | str | None) -> str:
    return secret.get_secret_value() if isinstance(secret, SecretStr) else secret or ""


def redact(text: str, *secrets: SecretStr | str | None) -> str:
    """`text` with every secret in it replaced by `***` (a short one where it is a whole token)."""
    for value in sorted(filter(None, map(_value, secrets)), key=len, reverse=True):
        if len(value) >= MIN_SECRET_CHARS:
            text = text.replace(value, MASK)
        else:
            text = re.sub(rf"(?<![0-9A-Za-z]){re.escape(value)}(?![0-9A-Za-z])", MASK, text)
    return text


def excerpt(text: str, limit: int, *secrets: SecretStr | str | None) -> str:
    """At most `limit` characters of `text`, the secrets redacted first (a key cut in two
    would no longer match, and its head would show)."""
    return redact(text, *secrets)[:limit]


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
