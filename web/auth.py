"""Login, JWT issue and verification, and the users who may log in."""

from __future__ import annotations

import logging
import os
import secrets
import time
from pathlib import Path

import jwt
import trio
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from web.errors import unauthorized
from web.login_throttle import LoginLimiter, LoginThrottle
from web.settings import Settings

logger = logging.getLogger(__name__)

ALGORITHM = "HS256"
TOKEN_TYPE = "access"  # noqa: S105 (a claim value, not a secret)
#: How many verified tokens are remembered (a few hundred bytes each).
VERIFIED_TOKENS = 4096
# Argon2 verification costs tens of milliseconds of CPU: run it in threads, two at a time.
_HASH_THREADS = trio.CapacityLimiter(2)


class UsersFileError(ValueError):
    """``USERS_FILE`` cannot be read or has a malformed line."""


def load_users_file(path: Path) -> dict[str, str]:
    """Read ``email:argon2-hash`` lines (``#`` comments and blank lines ignored).

    Raises:
        UsersFileError: Naming the file and line.
    """
    users: dict[str, str] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise UsersFileError(f"USERS_FILE {path}: {exc.strerror}") from None
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        email, sep, hashed = text.partition(":")
        if not sep or "@" not in email or not hashed.startswith("$argon2"):
            raise UsersFileError(f"USERS_FILE {path} line {number}: expected email:$argon2...")
        users[email.strip().lower()] = hashed.strip()
    return users


def kept_secret(path: Path) -> str:
    """The signing key kept in ``path``, made (random, mode 0600) on first use: with no
    ``AUTH_SECRET``, tokens then survive restarts as the jobs do.

    Raises:
        OSError: The file cannot be read or made.
    """
    try:
        kept = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        kept = ""
    if kept:  # an empty file (a power cut as it was made) is made again
        return kept
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(48)
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="ascii") as file:
        file.write(secret + "\n")
        file.flush()
        os.fsync(file.fileno())
    partial.replace(path)
    logger.info("AUTH_SECRET is not set: made a signing key, kept in %s", path)
    return secret


class Authenticator:
    """Checks passwords and issues and verifies access tokens.

    Args:
        settings: The demo user, ``USERS_FILE``, ``AUTH_SECRET``, ``TOKEN_TTL_S``.
        hasher: Argon2 parameters (tests pass cheap ones).
        secret: Overrides ``AUTH_SECRET``; with neither, one is generated (tokens then do not
            survive a restart, and a warning says so).
    """

    def __init__(
        self, settings: Settings, *, hasher: PasswordHasher | None = None, secret: str | None = None
    ) -> None:
        self._hasher = hasher or PasswordHasher()
        self.ttl_s = settings.token_ttl_s
        secret = secret or settings.auth_secret
        if secret is None:
            logger.warning(
                "AUTH_SECRET is not set: using a random secret; tokens will not survive a restart"
            )
            secret = secrets.token_urlsafe(48)
        self._secret = secret
        self._users = load_users_file(settings.users_file) if settings.users_file else {}
        self._users.setdefault(
            settings.demo_email.lower(), self._hasher.hash(settings.demo_password)
        )
        self._dummy_hash = self._hasher.hash(secrets.token_urlsafe(16))
        #: Tokens whose signature was checked: user and expiry (insertion-ordered, bounded).
        self._verified: dict[str, tuple[str, float]] = {}
        #: Failed logins (this process's own; ``run_server`` swaps in one shared through Redis).
        self.throttle: LoginLimiter = LoginThrottle(
            max_failures=settings.login_max_failures, window_s=settings.login_window_s
        )

    def knows(self, email: str) -> bool:
        return email in self._users

    async def check_password(self, email: str, password: str) -> str | None:
        """The user's canonical email if ``password`` is theirs, else ``None``."""
        key = email.strip().lower()
        hashed = self._users.get(key, self._dummy_hash)
        ok = await trio.to_thread.run_sync(self._verify, hashed, password, limiter=_HASH_THREADS)
        return key if ok and key in self._users else None

    def _verify(self, hashed: str, password: str) -> bool:
        try:
            return self._hasher.verify(hashed, password)
        except (VerificationError, InvalidHashError):
            return False

    def issue(self, email: str) -> str:
        now = int(time.time())
        claims = {"sub": email, "iat": now, "exp": now + self.ttl_s, "type": TOKEN_TYPE}
        return jwt.encode(claims, self._secret, algorithm=ALGORITHM)

    def verify(self, token: str) -> str:
        """The user a token was issued to.

        A token verified once is remembered (bounded, oldest first out) with its expiry, so a
        client's every request costs a dict lookup, not a signature check; the expiry and the
        user are still checked on every use.

        Raises:
            APIError: 401 (with ``WWW-Authenticate: Bearer``) for an expired, forged or
                malformed token, another type, another algorithm, or an unknown user.
        """
        known = self._verified.get(token)
        if known is None:
            known = self._verify_token(token)
            if len(self._verified) >= VERIFIED_TOKENS:
                del self._verified[next(iter(self._verified))]
            self._verified[token] = known
        subject, expires = known
        if expires <= time.time():
            del self._verified[token]
            raise unauthorized("Token has expired")
        if not self.knows(subject):
            raise unauthorized("Invalid token")
        return subject

    def _verify_token(self, token: str) -> tuple[str, float]:
        """The token's user and expiry once its signature and claims are checked."""
        try:
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=[ALGORITHM],
                options={"require": ["exp", "iat", "sub", "type"]},
            )
        except jwt.ExpiredSignatureError:
            raise unauthorized("Token has expired") from None
        except jwt.InvalidTokenError:
            raise unauthorized("Invalid token") from None
        subject = claims.get("sub")
        if claims.get("type") != TOKEN_TYPE or not isinstance(subject, str):
            raise unauthorized("Invalid token")
        return subject, float(claims["exp"])


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, if that is what it is."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def authenticate(
    auth: Authenticator, authorization: str | None, query_token: str | None = None
) -> str:
    """The user behind a request's credentials (header first, then a ``?token=``).

    Raises:
        APIError: 401 when there are none or they do not hold.
    """
    token = bearer_token(authorization)
    if token is None and authorization:
        raise unauthorized("Authorization header must be 'Bearer <token>'")
    token = token or query_token
    if not token:
        raise unauthorized("Not authenticated")
    return auth.verify(token)


def hash_password_cli() -> None:
    """``python -m web.auth EMAIL`` reads a password from stdin and prints a USERS_FILE line."""
    import sys  # noqa: PLC0415 (only this command line needs it)

    if len(sys.argv) != 2 or "@" not in sys.argv[1]:
        sys.stderr.write("usage: python -m web.auth EMAIL < password\n")
        raise SystemExit(2)
    password = sys.stdin.readline().rstrip("\n")
    sys.stdout.write(f"{sys.argv[1].lower()}:{PasswordHasher().hash(password)}\n")


if __name__ == "__main__":
    hash_password_cli()
