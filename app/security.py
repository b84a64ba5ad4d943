"""Who may call the API and how much one request may take: API keys and the ingress's ASGI guard.

API keys come from the environment of the ingress replica's process, never from the application's
arguments (those are stored in the Serve config and shown by `serve status` and the dashboard) nor
from a command line (where `ps` shows them):

- ``TREESPEC_API_KEYS``: comma-separated keys;
- ``TREESPEC_API_KEYS_FILE``: a file of keys, one per line or comma-separated (lines starting with
  ``#`` are comments).

Keys from both count. With at least one key, every route but ``/health`` needs
``Authorization: Bearer <key>`` (what the ``openai`` client sends for ``api_key=...``); with none,
the API is open. Only SHA-256 digests of the keys are kept; a presented key is compared with every
one of them by ``hmac.compare_digest``, so neither the time taken nor the answer says which key,
or how much of one, matched.

``Guard`` is the outermost ASGI middleware of the ingress app. Per HTTP request, in order:

1. the key (401 without a valid one; nothing of the body is read);
2. a ``Content-Length`` above ``max_request_bytes``: 413 at once;
3. a request with a body (POST, PUT, PATCH): the body is read here, its bytes counted as they
   arrive (413 once past the limit, chunked bodies included), within ``request_read_timeout_s``
   (408), and then handed to the route.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import re
from dataclasses import dataclass
from typing import Callable

from app.protocol import APIError

KEYS_ENV = "TREESPEC_API_KEYS"
KEYS_FILE_ENV = "TREESPEC_API_KEYS_FILE"
OPEN_PATHS = frozenset({"/health"})  # load balancers and KubeRay probe it without a key
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})

_KEY = re.compile(r"[\x21-\x7e]+")  # visible ASCII: what an HTTP header carries unchanged


def api_keys_configured(environ=None) -> bool:
    """Whether the environment names API keys (without reading or checking them)."""
    env = os.environ if environ is None else environ
    return bool(env.get(KEYS_ENV, "").strip() or env.get(KEYS_FILE_ENV, "").strip())


def load_api_keys(environ=None) -> list[str]:
    """The API keys of TREESPEC_API_KEYS and TREESPEC_API_KEYS_FILE ([] when neither is set).

    Raises ValueError (naming the variable or file, never a key) when a variable is set but yields
    no key, the file cannot be read, or a key has characters a header cannot carry.
    """
    env = os.environ if environ is None else environ
    keys: list[str] = []
    raw = env.get(KEYS_ENV, "")
    if raw.strip():
        found = _split(raw)
        if not found:
            raise ValueError(f"{KEYS_ENV} is set but holds no key (keys are separated by commas)")
        keys += _checked(found, KEYS_ENV)
    path = env.get(KEYS_FILE_ENV, "").strip()
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise ValueError(f"{KEYS_FILE_ENV}={path}: cannot read it ({reason})") from None
        found = [k for line in text.splitlines() if not line.lstrip().startswith("#") for k in _split(line)]
        if not found:
            raise ValueError(f"{KEYS_FILE_ENV}={path} holds no key")
        keys += _checked(found, f"{KEYS_FILE_ENV}={path}")
    return keys


def _split(text: str) -> list[str]:
    return [k.strip() for k in text.split(",") if k.strip()]


def _checked(keys: list[str], source: str) -> list[str]:
    for i, k in enumerate(keys):
        if not _KEY.fullmatch(k):
            raise ValueError(f"API key #{i + 1} of {source} has characters an HTTP header cannot carry "
                             f"(use letters, digits and punctuation)")
    return keys


class APIKeys:
    """The configured keys, as SHA-256 digests; ``verdict`` checks an Authorization header."""

    def __init__(self, keys: list[str]):
        self._digests = [hashlib.sha256(k.encode()).digest() for k in keys]

    def __len__(self) -> int:
        return len(self._digests)

    def __repr__(self) -> str:  # never the keys
        return f"APIKeys({len(self)} keys)"

    def verdict(self, authorization: bytes | None) -> str | None:
        """None when the header carries a configured key, else the error code for the 401."""
        if not authorization or not authorization.strip():
            return "missing_api_key"
        scheme, _, token = authorization.strip().partition(b" ")
        token = token.strip()
        if scheme.lower() != b"bearer" or not token:
            return "invalid_api_key"
        digest = hashlib.sha256(token).digest()
        match = False
        for ref in self._digests:  # every key, no early exit
            match |= hmac.compare_digest(digest, ref)
        return None if match else "invalid_api_key"


@dataclass
class GuardSettings:
    keys: APIKeys
    max_request_bytes: int
    read_timeout_s: float
    refused: Callable[[str, int], None] | None = None  # (route path, status): counts refusals


def guard_settings(cfg, environ=None, refused=None) -> GuardSettings:
    """The ingress's GuardSettings from its AppConfig and its process environment.

    Raises ValueError when keys are required (``require_api_keys``) and none is found, so a
    deployment meant to be private fails to start rather than serving an open API.
    """
    keys = load_api_keys(environ)
    if cfg.require_api_keys and not keys:
        raise ValueError(f"require_api_keys is set but the ingress found no API key: set {KEYS_ENV} or "
                         f"{KEYS_FILE_ENV} in the environment of the Ray nodes that run it (docs/operations.md)")
    return GuardSettings(APIKeys(keys), cfg.max_request_bytes, cfg.request_read_timeout_s, refused)


def route_path(scope) -> str:
    """The request's path below the application's route prefix (ASGI root_path)."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and path.startswith(root) and (len(path) == len(root) or path[len(root)] == "/"):
        return path[len(root):] or "/"
    return path


class _TooLarge(Exception):
    pass


class _Disconnected(Exception):
    pass


class Guard:
    """ASGI middleware: API keys, then the request body's size and upload time (module docstring).

    settings: GuardSettings, or a function returning them (resolved at the first request: in a
    Serve replica they belong to the deployment instance, which exists only by then).
    """

    def __init__(self, app, settings: GuardSettings | Callable[[], GuardSettings]):
        self.app = app
        self._settings = settings

    def settings(self) -> GuardSettings:
        if callable(self._settings):
            self._settings = self._settings()
        return self._settings

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        s = self.settings()
        path = route_path(scope)
        headers = {}
        for name, value in scope.get("headers", ()):
            headers.setdefault(name.lower(), value)
        if len(s.keys) and path not in OPEN_PATHS:
            code = s.keys.verdict(headers.get(b"authorization"))
            if code is not None:
                message = ("Missing API key: send it as the header 'Authorization: Bearer <key>'."
                           if code == "missing_api_key" else "Incorrect API key provided.")
                return await self._refuse(scope, send, path, s, 401, message, code,
                                          {"www-authenticate": 'Bearer realm="treespec"'})
        length = headers.get(b"content-length")
        if length is not None:
            if not length.strip().isdigit():
                return await self._refuse(scope, send, path, s, 400, "Content-Length is not a number",
                                          "invalid_content_length", close=True)
            if int(length) > s.max_request_bytes:
                return await self._too_large(scope, send, path, s)
        if scope.get("method") in BODY_METHODS:
            try:
                async with asyncio.timeout(s.read_timeout_s):
                    body = await _read_body(receive, s.max_request_bytes)
            except TimeoutError:
                return await self._refuse(scope, send, path, s, 408,
                                          f"the request body did not arrive within {s.read_timeout_s:g}s",
                                          "request_timeout", close=True)
            except _TooLarge:
                return await self._too_large(scope, send, path, s)
            except _Disconnected:
                return None  # nobody to answer
            receive = _replay(body, receive)
        return await self.app(scope, receive, send)

    async def _too_large(self, scope, send, path, s):
        return await self._refuse(scope, send, path, s, 413,
                                  f"the request body is larger than {s.max_request_bytes} bytes "
                                  f"(max_request_bytes)", "request_too_large", close=True)

    async def _refuse(self, scope, send, path, s, status, message, code, headers=None, close=False):
        body = json.dumps(APIError(status, message, code=code).body()).encode()
        raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
        if close:  # the client may still be sending a body nobody will read
            raw.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": body, "more_body": False})
        if s.refused is not None:
            s.refused(path, status)


async def _read_body(receive, limit: int) -> bytes:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _Disconnected
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _TooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive):
    """A receive that hands the app the body read already, then the client's later messages
    (a disconnect), so the routes still notice a client that goes away."""
    pending = True

    async def replay():
        nonlocal pending
        if pending:
            pending = False
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
