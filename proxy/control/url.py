"""The control plane's Redis URL: checked once, never logged with its password."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

SCHEMES = ("redis", "rediss")


def check_control_url(url: str) -> str:
    """The URL as given, when it is a redis:// or rediss:// URL with a host,
    a port that is a number and a database that is one; else ValueError
    (whose text never holds the password)."""
    text = url.strip()
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        raise ValueError(f"control: {redact(text)!r} is not a valid URL") from None
    if parts.scheme not in SCHEMES:
        raise ValueError(f"control: {redact(text)!r}: the scheme must be redis:// or "
                         "rediss:// (TLS)")
    if not parts.hostname:
        raise ValueError(f"control: {redact(text)!r} names no host")
    if port is not None and port == 0:
        raise ValueError(f"control: {redact(text)!r}: port 0")
    db = parts.path.strip("/")
    if db and not db.isdigit():
        raise ValueError(f"control: {redact(text)!r}: the database must be a number, "
                         f"not {db!r}")
    return text


def redact(url: str) -> str:
    """The URL with its password (if any) replaced by '***'."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<invalid URL>"
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
