"""The HTTP side of `evotok bench --endpoint URL`: one OpenAI-compatible server, asked with the standard library.

No HTTP package is needed (urllib and a thread pool do it), so the plain `pip install -e .` benches a server
too. The first contact (`connect`: GET /v1/models) is one try with a short timeout, so a wrong URL or a
closed port is one error line at once; after it, a request that meets a 429/502/503/504 or a dropped
connection is retried with exponential backoff (honouring Retry-After) a bounded number of times, and then
the run stops with one line: the finished items are in the sample files, so the same command resumes.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

from evotok_cli.base.errors import ConfigError

PROBE_TIMEOUT_S = 10.0  # the first GET /v1/models
REQUEST_TIMEOUT_S = 900.0  # one completion, its time in the server's queue included (serve's --timeout: 600)
RETRY_STATUSES = (429, 502, 503, 504)
RETRIES = 6  # tries after the first: about 30 s of backoff in all (0.5, 1, 2, 4, 8, 15)
BACKOFF_S = (0.5, 1.0, 2.0, 4.0, 8.0, 15.0)
MAX_RETRY_AFTER_S = 15.0
FIX_UNREACHABLE = "start the server (e.g. `evotok serve`) or correct --endpoint; a rerun resumes"


def check_url(url: str) -> str:
    """The server's root (`http://host:port[/prefix]`), from a URL given with or without `/v1`."""
    parsed = urllib.parse.urlsplit(url.strip())
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ConfigError(f"{url!r} is not an http(s) URL", where="--endpoint",
                          fix="e.g. --endpoint http://127.0.0.1:8000/v1")
    try:
        parsed.port  # noqa: B018 - raises on a port out of range or not a number
    except ValueError:
        raise ConfigError(f"{url!r} has an invalid port", where="--endpoint",
                          fix="e.g. --endpoint http://127.0.0.1:8000/v1") from None
    if parsed.query or parsed.fragment:
        raise ConfigError(f"{url!r} has a query or fragment", where="--endpoint",
                          fix="give the server's base URL, e.g. http://127.0.0.1:8000/v1")
    path = parsed.path.rstrip("/")
    path = path[:-3] if path.endswith("/v1") else path
    return urllib.parse.urlunsplit((parsed.scheme, parsed.netloc, path, "", ""))


@dataclass
class Server:
    """What the server said about itself: `models` is its whole /v1/models answer."""

    url: str  # the root, without /v1
    api_key: str | None
    models: dict[str, Any]
    model_id: str
    card: dict[str, Any]  # the served model's entry of `models`

    @property
    def evotok(self) -> bool:
        """evotok's own server (its model card has an `evotok` section): it takes decoder, options, steps,
        block_length and gen_length, and returns the generated span's token ids."""
        return isinstance(self.card.get("evotok"), dict)

    def describe(self) -> dict[str, Any]:
        return {"endpoint": self.url, "kind": "evotok" if self.evotok else "openai", "served_model": self.model_id,
                "adapter": self.card.get("adapter"), "models": self.models}


class Client:
    """JSON over HTTP with the API key, retries and one-line errors."""

    def __init__(self, url: str, api_key: str | None, sleep: Any = time.sleep):
        self.url, self.api_key, self.sleep = url, api_key, sleep

    def call(self, method: str, path: str, body: dict[str, Any] | None = None, *, retries: int = RETRIES,
             timeout: float = REQUEST_TIMEOUT_S) -> dict[str, Any]:
        for attempt in range(retries + 1):
            try:
                return self._once(method, path, body, timeout)
            except _Retryable as exc:
                if attempt == retries:
                    raise ConfigError(f"{exc.what} (after {retries + 1} tries)" if retries else exc.what,
                                      where=f"--endpoint {self.url}", fix=FIX_UNREACHABLE) from None
                self.sleep(min(exc.retry_after, MAX_RETRY_AFTER_S) if exc.retry_after is not None
                           else BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)])
        raise AssertionError("unreachable")

    def _once(self, method: str, path: str, body: dict[str, Any] | None, timeout: float) -> dict[str, Any]:
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data, headers["Content-Type"] = json.dumps(body).encode("utf-8"), "application/json"
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as answer:  # noqa: S310 - http(s) only
                raw = answer.read()
        except urllib.error.HTTPError as exc:
            raise self._http_error(exc, path) from None
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise _Retryable(f"cannot reach {self.url}{path} ({reason})") from None
        try:
            value = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ConfigError(f"{path} answered something that is not JSON", where=f"--endpoint {self.url}",
                              fix="point --endpoint at an OpenAI-compatible server") from None
        if not isinstance(value, dict):
            raise ConfigError(f"{path} answered JSON that is not an object", where=f"--endpoint {self.url}",
                              fix="point --endpoint at an OpenAI-compatible server")
        return value

    def _http_error(self, exc: urllib.error.HTTPError, path: str) -> Exception:
        message = _error_message(exc)
        if exc.code in RETRY_STATUSES:
            after = exc.headers.get("Retry-After", "") if exc.headers else ""
            return _Retryable(f"{path} answered {exc.code}: {message}",
                              float(after) if after.strip().isdigit() else None)
        if exc.code in (401, 403):
            return ConfigError(f"the server refused the API key ({exc.code}: {message})",
                               where=f"--endpoint {self.url}", fix="pass the server's key with --api-key or "
                               "EVOTOK_API_KEY")
        if exc.code == 404 and path.startswith("/v1/models"):
            return ConfigError(f"{path} is not found (404): not an OpenAI-compatible server, or a wrong prefix",
                               where=f"--endpoint {self.url}", fix="give the URL the server's clients use, "
                               "e.g. http://127.0.0.1:8000/v1")
        return ConfigError(f"{path} answered {exc.code}: {message}", where=f"--endpoint {self.url}",
                           fix="change the settings the server refused, or serve the model they need")


class _Retryable(Exception):
    def __init__(self, what: str, retry_after: float | None = None):
        super().__init__(what)
        self.what, self.retry_after = what, retry_after


def _error_message(exc: urllib.error.HTTPError) -> str:
    """The OpenAI error object's message, else the start of the body, on one line."""
    try:
        raw = exc.read()[:4096].decode("utf-8", "replace")
    except OSError:
        raw = ""
    try:
        error = json.loads(raw).get("error")
        text = error.get("message") if isinstance(error, dict) else str(error or raw)
    except (json.JSONDecodeError, AttributeError):
        text = raw or exc.reason
    return " ".join(str(text).split())[:300] or "no message"


def connect(url: str, api_key: str | None) -> tuple[Server, Client]:
    """The server behind `url`, from one GET /v1/models (no retries: a closed port is an error at once)."""
    root = check_url(url)
    client = Client(root, api_key)
    models = client.call("GET", "/v1/models", retries=0, timeout=PROBE_TIMEOUT_S)
    data = models.get("data")
    cards = [c for c in data if isinstance(c, dict) and isinstance(c.get("id"), str)] if isinstance(data, list) else []
    if not cards:
        raise ConfigError("/v1/models lists no model", where=f"--endpoint {root}",
                          fix="point --endpoint at an OpenAI-compatible server that serves a model")
    return Server(root, api_key, models, cards[0]["id"], cards[0]), client


def completion(client: Client, body: dict[str, Any]) -> dict[str, Any]:
    """POST /v1/completions and check the answer has a first choice."""
    answer = client.call("POST", "/v1/completions", body)
    choices = answer.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise ConfigError("/v1/completions answered without choices", where=f"--endpoint {client.url}",
                          fix="point --endpoint at an OpenAI-compatible server")
    return answer
