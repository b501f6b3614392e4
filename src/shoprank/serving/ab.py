"""A/B and shadow traffic split: which arm serves a request.

Modes (``SHOPRANK_SERVE_MODE``):

* ``champion``: every request is served by ``@champion``;
* ``ab``: a stable hash of ``session_id`` sends ``challenger_share`` of the sessions to
  ``@challenger`` (the same session always gets the same arm, so a shopper never sees the
  ranking flip mid-session); requests without a session id go to the champion;
* ``shadow``: every request is served by the champion; the challenger also scores it in the
  background and only its agreement with the champion is recorded as metrics.
"""

from __future__ import annotations

import hashlib

MODES = ("champion", "ab", "shadow")
CHAMPION, CHALLENGER = "champion", "challenger"


def bucket(session_id: str, salt: str = "shoprank-ab") -> float:
    """Uniform in [0, 1), stable for a (salt, session) pair across processes and restarts."""
    digest = hashlib.blake2b(f"{salt}\x1f{session_id}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0 ** 64


def choose_arm(mode: str, session_id: str | None, challenger_share: float, salt: str = "shoprank-ab") -> str:
    """The arm that serves a request (before checking a challenger is loaded)."""
    if mode != "ab" or not session_id or challenger_share <= 0:
        return CHAMPION
    return CHALLENGER if bucket(session_id, salt) < challenger_share else CHAMPION
