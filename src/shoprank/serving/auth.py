"""Secrets of the ranking API and who may call what (docs/serving.md, "Authentication").

All of the API's secrets are read here, once, at start; nothing here generates one:

* ``SHOPRANK_SERVE_EVENTS_TOKEN`` (required): bearer token of ``POST /events``;
* ``SHOPRANK_SERVE_RANK_TOKEN`` (optional): when set, ``POST /rank`` needs it too;
* ``SHOPRANK_SERVE_ADMIN_TOKEN`` (optional): bearer token of the admin endpoint
  ``GET /metrics``; unset, ``/metrics`` takes the events token;
* ``SHOPRANK_USER_HASH_KEY`` (required once there is storage to write events to): the HMAC
  key of user-id pseudonymisation (:func:`shoprank.data.simulator.pseudonymise`), also what
  the traffic simulator hashes with (:func:`user_hash_key`).

Values come from the settings tree's ``serving`` group (:mod:`shoprank.config`: the
environment, then ``.env``, then ``$SHOPRANK_HOME/stack.env``, which ``shoprank stack up``
fills with generated values for the embedded stack).  A missing required value is a :class:`~shoprank.config.ConfigError` naming
the variable, raised by :func:`shoprank.serving.app.create_app` before the server listens.

Clients send ``Authorization: Bearer <token>``; a missing or wrong token gets 401 with
``WWW-Authenticate: Bearer``.  Tokens are compared with :func:`hmac.compare_digest`.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable, Mapping

from fastapi import Depends, HTTPException
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from shoprank.config import ConfigError

EVENTS_TOKEN_ENV = "SHOPRANK_SERVE_EVENTS_TOKEN"
RANK_TOKEN_ENV = "SHOPRANK_SERVE_RANK_TOKEN"
ADMIN_TOKEN_ENV = "SHOPRANK_SERVE_ADMIN_TOKEN"
USER_HASH_KEY_ENV = "SHOPRANK_USER_HASH_KEY"


def _serving(environ: Mapping[str, str] | None, home: Path | str | None):
    """The settings tree's ``serving`` group (environment, ``.env``, ``<home>/stack.env``; an
    empty value counts as unset, so a blank ``SHOPRANK_USER_HASH_KEY=`` copied from
    .env.example does not hide the one in stack.env)."""
    import os

    from shoprank.config import Settings

    env = dict(os.environ if environ is None else environ)
    if home is not None:
        env["SHOPRANK_HOME"] = str(home)
    return Settings.from_env(env).serving


def _token(value: str | None, name: str) -> str | None:
    value = (value or "").strip()
    if value and any(c.isspace() for c in value):
        raise ConfigError(f"{name} contains whitespace: a bearer token is one word")
    return value or None


def user_hash_key(environ: Mapping[str, str] | None = None, *, home: Path | str | None = None) -> str:
    """``SHOPRANK_USER_HASH_KEY`` (env, ``.env``, ``<home>/stack.env``); never a default."""
    key = _serving(environ, home).user_hash_key or ""
    if not key.strip():
        raise ConfigError(f"{USER_HASH_KEY_ENV} is not set: it is the secret HMAC key that pseudonymises user ids "
                          "(`shoprank stack up` generates one into $SHOPRANK_HOME/stack.env; elsewhere set it, "
                          "the same on every replica and producer)")
    return key


@dataclass(frozen=True)
class ServeAuth:
    """The API's bearer tokens (values never appear in ``repr``)."""

    events_token: str = field(repr=False)
    rank_token: str | None = field(default=None, repr=False)
    admin_token: str | None = field(default=None, repr=False)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, *,
                 home: Path | str | None = None) -> "ServeAuth":
        serving = _serving(environ, home)
        events = _token(serving.events_token, EVENTS_TOKEN_ENV)
        if events is None:
            raise ConfigError(f"{EVENTS_TOKEN_ENV} is not set: the ranking API requires a bearer token for "
                              "POST /events and does not make one up. Set it to a long random value "
                              "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`) and give "
                              "it to the event producers; `shoprank stack up` generates one into "
                              "$SHOPRANK_HOME/stack.env")
        return cls(events, _token(serving.rank_token, RANK_TOKEN_ENV),
                   _token(serving.admin_token, ADMIN_TOKEN_ENV)).checked()

    def checked(self) -> "ServeAuth":
        if not (self.events_token or "").strip():
            raise ConfigError(f"{EVENTS_TOKEN_ENV} is empty: the ranking API requires a token for POST /events")
        return self

    @property
    def metrics_token(self) -> str:
        """``GET /metrics``: the admin token, else the events token."""
        return self.admin_token or self.events_token


_BEARER = HTTPBearer(auto_error=False, scheme_name="bearer",
                     description="Authorization: Bearer <token> (docs/serving.md, Authentication)")


def bearer(token: str | None, variable: str) -> Callable[..., Awaitable[None]]:
    """A FastAPI dependency: 401 unless ``Authorization: Bearer <token>``; no check when ``token`` is None."""
    if not token:
        async def open_route() -> None:
            return None

        return open_route
    expected = token.encode("utf-8")

    async def check(credentials: HTTPAuthorizationCredentials | None = Depends(_BEARER)) -> None:
        if credentials is not None and hmac.compare_digest(credentials.credentials.strip().encode("utf-8"), expected):
            return
        error = ("missing bearer token: send 'Authorization: Bearer <token>'" if credentials is None
                 else "wrong bearer token") + f" (the token is {variable})"
        raise HTTPException(status_code=401, detail={"field": "authorization", "error": error},
                            headers={"WWW-Authenticate": 'Bearer realm="shoprank"'})

    return check
