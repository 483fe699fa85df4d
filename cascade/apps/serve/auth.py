"""Bearer-token access: the token is read from a file (never from the command line, where ``ps`` shows it)."""

from __future__ import annotations

import hmac
import os
from pathlib import Path

from cascade.errors import ConfigError

MIN_TOKEN_LENGTH = 16
LOOPBACK_NAMES = ("localhost",)


def read_token(path: str | os.PathLike[str]) -> str:
    """The token in ``path`` (surrounding whitespace dropped); ``ConfigError`` when missing, short or spaced."""
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read the token file ({type(err).__name__})") from None
    if len(token) < MIN_TOKEN_LENGTH or any(c.isspace() for c in token):
        raise ConfigError(
            f"{path}: the token must be one word of at least {MIN_TOKEN_LENGTH} characters "
            "(for example: python -c 'import secrets; print(secrets.token_urlsafe(32))' > FILE)"
        )
    return token


def authorized(header: str | None, token: str) -> bool:
    """Whether an ``Authorization`` header carries ``Bearer <token>`` (compared in constant time)."""
    scheme, _, given = (header or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


def is_loopback(host: str) -> bool:
    """Whether ``host`` names only this machine (127.0.0.0/8, ::1, localhost): safe to serve without a token."""
    import ipaddress

    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
