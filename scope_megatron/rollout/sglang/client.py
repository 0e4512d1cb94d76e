"""HTTP client for one or several SGLang servers.

Every call goes through `SGLangClient.post`: a server is chosen (the least loaded, ties in
round-robin order), the JSON body is sent with a per-request timeout, and transient failures are
retried with exponential backoff, preferring another server on the retry:

  transient (retried): connection refused / reset / closed early, timeout, HTTP 5xx, HTTP 429,
    a body that is not JSON, and an answer that `validate` rejects (ResponseInvalid), e.g. fewer
    log-probs than tokens or finish_reason "abort";
  permanent (raised at once): any other HTTP 4xx (the request itself is wrong: the server's
    message is quoted).

After the last attempt an SGLangError names the server, the endpoint, the request index and the
last error (and every attempt). `map` runs many requests with bounded concurrency (a thread pool of
`max_in_flight` workers, one requests.Session per thread) and returns the answers in order. Each
attempt of a map request carries its own `rid` (one per batch item; a retry gets a new one: SGLang
refuses the rid of a request it still runs). When one of them fails for good (or the caller is
interrupted), the queued ones are cancelled and the running ones aborted on their servers by rid
(POST /abort_request {"rid"}: other requests on the servers, other clients' included, go on) and
not retried, so that the error surfaces in seconds rather than after the longest generation.
"""
from __future__ import annotations

import json
import random
import threading
import time
import uuid
import concurrent.futures
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, List, Optional, Sequence

import requests


class SGLangError(RuntimeError):
    """A request to an SGLang server failed for good (after retries, or a rejected request), or a
    server's answer or state contradicts what was asked (weights, versions, log-probs)."""


class SGLangBadRequest(SGLangError):
    """The server rejected the request (HTTP 4xx other than 429): retrying cannot help."""


class ResponseInvalid(Exception):
    """Raised by a `validate` callback: the answer is malformed; the request is retried."""


def _json_message(body: str) -> str:
    """The human part of an SGLang error body ({"error": {"message"}}, {"message"}, or text)."""
    try:
        data = json.loads(body)
    except ValueError:
        return body.strip()[:2000]
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict) and "message" in err:
            return str(err["message"])
        if "message" in data:
            return str(data["message"])
        if "detail" in data:
            return str(data["detail"])
    return body.strip()[:2000]


class _Transient(Exception):
    pass


class _MapRun:
    """One map call's requests on the servers: the rids of the attempts running now, so that a
    failed map aborts exactly those, and whether it failed (its requests are then not retried)."""

    def __init__(self):
        self.prefix = uuid.uuid4().hex
        self.failed = False
        self._lock = threading.Lock()
        self._running: Dict[str, tuple] = {}  # attempt key -> (url, rids)
        self._count = 0

    def start(self, payload: Any, url: str) -> tuple:
        """(the payload with this attempt's rid(s), attempt key). Raises SGLangError once the map
        has failed (no new attempt then). A payload that is not a /generate body, or names its own
        rid, or asks for n > 1 samples (SGLang gives those fresh rids), is sent as it is and cannot
        be aborted."""
        with self._lock:
            if self.failed:
                raise SGLangError("abandoned after another request of the map failed")
            self._count += 1
            key = f"{self.prefix}-{self._count}"
            payload, rids = _with_rid(payload, key)
            if rids:
                self._running[key] = (url, rids)
            return payload, key

    def done(self, key: str) -> None:
        with self._lock:
            self._running.pop(key, None)

    def fail(self) -> Dict[str, List[str]]:
        """Marks the map failed; {url: rids} of its attempts running now."""
        with self._lock:
            self.failed = True
            out: Dict[str, List[str]] = {}
            for url, rids in self._running.values():
                out.setdefault(url, []).extend(rids)
            return out


def _with_rid(payload: Any, key: str) -> tuple:
    """(payload with rid(s) from `key`, those rids): a rid per batch item; ([], payload as it is)
    for what cannot carry ours (see _MapRun.start)."""
    if not isinstance(payload, dict) or "rid" in payload:
        return payload, []
    inputs = payload.get("input_ids", payload.get("text"))
    sps = payload.get("sampling_params") or {}
    if inputs is None or any(isinstance(sp, dict) and sp.get("n", 1) != 1
                             for sp in (sps if isinstance(sps, list) else [sps])):
        return payload, []
    if isinstance(inputs, list) and inputs and isinstance(inputs[0], (list, str)):  # a batch
        rids = [f"{key}-{i}" for i in range(len(inputs))]
        return dict(payload, rid=rids), rids
    return dict(payload, rid=key), [key]


class SGLangClient:
    """Requests to a set of SGLang servers.

    urls: base URLs ("http://host:port"), at least one.
    max_in_flight: requests running at once in `map` (thread-pool size).
    timeout: seconds per request (read timeout; connecting gets min(timeout, connect_timeout)).
    retries: extra attempts after the first for transient failures.
    backoff, max_backoff: the wait before retry k is min(backoff * 2**k, max_backoff) seconds.
    progress: show a tqdm bar over the requests of `map` (if tqdm is installed).
    """

    def __init__(self, urls: Sequence[str], *, max_in_flight: int = 64, timeout: float = 600.0,
                 connect_timeout: float = 10.0, retries: int = 3, backoff: float = 0.5,
                 max_backoff: float = 8.0, progress: bool = False):
        if isinstance(urls, str):
            urls = [urls]
        self.urls: List[str] = [u.rstrip("/") for u in urls]
        if not self.urls:
            raise ValueError("SGLangClient: no server URLs")
        if len(set(self.urls)) != len(self.urls):
            raise ValueError(f"SGLangClient: duplicate server URLs {self.urls}")
        if max_in_flight < 1 or retries < 0 or timeout <= 0:
            raise ValueError("SGLangClient: max_in_flight >= 1, retries >= 0 and timeout > 0 are required")
        self.max_in_flight = int(max_in_flight)
        self.timeout = float(timeout)
        self.connect_timeout = float(connect_timeout)
        self.retries = int(retries)
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.progress = progress
        self._lock = threading.Lock()
        self._in_flight: Dict[str, int] = {u: 0 for u in self.urls}
        self._next = 0
        self._local = threading.local()
        self._sessions: List[requests.Session] = []
        self._pool: Optional[ThreadPoolExecutor] = None

    # -- plumbing -------------------------------------------------------------------------------

    def _session(self) -> requests.Session:
        s = getattr(self._local, "session", None)
        if s is None:
            s = requests.Session()
            adapter = requests.adapters.HTTPAdapter(pool_connections=len(self.urls),
                                                    pool_maxsize=4, max_retries=0)
            s.mount("http://", adapter)
            s.mount("https://", adapter)
            self._local.session = s
            with self._lock:
                self._sessions.append(s)
        return s

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.max_in_flight, thread_name_prefix="sglang-client")
            return self._pool

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
            sessions, self._sessions = self._sessions, []
        if pool is not None:
            pool.shutdown(wait=True)
        for s in sessions:
            s.close()
        self._local = threading.local()  # a later request opens new sessions

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _acquire(self, avoid: Sequence[str]) -> str:
        """The least-loaded server not in `avoid` (all servers if every one is avoided); ties go
        round-robin."""
        with self._lock:
            candidates = [u for u in self.urls if u not in avoid] or list(self.urls)
            n, start = len(self.urls), self._next
            url = min(candidates, key=lambda u: (self._in_flight[u], (self.urls.index(u) - start) % n))
            self._next = (self.urls.index(url) + 1) % len(self.urls)
            self._in_flight[url] += 1
            return url

    def _release(self, url: str) -> None:
        with self._lock:
            self._in_flight[url] -= 1

    def _once(self, method: str, url: str, path: str, payload, timeout: float):
        try:
            resp = self._session().request(method, url + path, json=payload,
                                           timeout=(min(self.connect_timeout, timeout), timeout))
        except requests.Timeout as exc:
            raise _Transient(f"timed out after {timeout:g} s ({type(exc).__name__})") from exc
        except requests.RequestException as exc:  # refused, reset, closed without an answer
            raise _Transient(f"{type(exc).__name__}: {exc}") from exc
        if resp.status_code == 429 or resp.status_code >= 500:
            raise _Transient(f"HTTP {resp.status_code}: {_json_message(resp.text)}")
        if resp.status_code >= 400:
            raise SGLangBadRequest(f"HTTP {resp.status_code}: {_json_message(resp.text)}")
        return resp

    # -- public ---------------------------------------------------------------------------------

    def request(self, method: str, path: str, payload: Any = None, *, url: Optional[str] = None,
                index: Optional[int] = None, timeout: Optional[float] = None,
                validate: Optional[Callable[[Any], None]] = None, parse_json: bool = True,
                retries: Optional[int] = None, _run: Optional[_MapRun] = None) -> Any:
        """One request with retries. url: a fixed server (default: chosen per attempt).
        index: the request's index, for error messages. validate(answer) may raise
        ResponseInvalid to have the request retried, or SGLangError to fail at once (an answer
        that contradicts the request). parse_json=False returns the body text. retries: this
        request's retry count (default: the client's; 0 for requests that must not repeat).
        _run: the map call this request belongs to (rids, abort, no retry once it failed)."""
        timeout = self.timeout if timeout is None else float(timeout)
        retries = self.retries if retries is None else int(retries)
        attempts: List[str] = []
        tried: List[str] = []
        where = f"request {index}" if index is not None else "request"
        for attempt in range(retries + 1):
            server = url or self._acquire(tried)
            try:
                try:
                    body, key = (payload, None) if _run is None else _run.start(payload, server)
                    try:
                        resp = self._once(method, server, path, body, timeout)
                    finally:
                        if key is not None:
                            _run.done(key)
                finally:
                    if url is None:
                        self._release(server)
                if not parse_json:
                    return resp.text
                try:
                    answer = resp.json()
                except ValueError as exc:
                    raise _Transient(f"malformed JSON ({exc}): {resp.text[:200]!r}") from exc
                if validate is not None:
                    try:
                        validate(answer)
                    except ResponseInvalid as exc:
                        raise _Transient(f"invalid answer: {exc}") from exc
                return answer
            except SGLangBadRequest as exc:
                raise SGLangBadRequest(f"SGLang server {server} rejected {method} {path} ({where}): "
                                       f"{exc}") from None
            except SGLangError as exc:  # raised by validate: the answer contradicts the request
                raise type(exc)(f"SGLang server {server}, {method} {path} ({where}): {exc}") from None
            except _Transient as exc:
                attempts.append(f"{server}: {exc}")
                tried.append(server)
                if _run is not None and _run.failed:
                    raise SGLangError(f"SGLang server {server}, {method} {path} ({where}): abandoned after "
                                      f"another request of the map failed ({exc})") from None
                if attempt == retries:
                    raise SGLangError(
                        f"SGLang server {server} failed {method} {path} ({where}) after "
                        f"{attempt + 1} attempt(s); last error: {exc}; attempts: " + " | ".join(attempts)
                    ) from None
                delay = min(self.backoff * 2 ** attempt, self.max_backoff)
                time.sleep(delay * (1.0 + 0.1 * random.random()))
        raise AssertionError("unreachable")

    def post(self, path: str, payload: Any, **kw) -> Any:
        return self.request("POST", path, payload, **kw)

    def get(self, path: str, **kw) -> Any:
        return self.request("GET", path, None, **kw)

    def map(self, path: str, payloads: Sequence[Any], *, validate: Optional[Callable[[int, Any], None]] = None,
            desc: Optional[str] = None, timeout: Optional[float] = None) -> List[Any]:
        """POSTs every payload (concurrently, at most max_in_flight at a time, spread over the
        servers) and returns the answers in order. validate(i, answer) checks answer i. The first
        request that fails for good raises its SGLangError; the requests still queued are
        cancelled and those running aborted (see the module docstring)."""
        payloads = list(payloads)
        if not payloads:
            return []
        pool = self._executor()
        map_run = _MapRun()

        def run(i):
            check = None if validate is None else (lambda answer: validate(i, answer))
            return self.post(path, payloads[i], index=i, validate=check, timeout=timeout, _run=map_run)

        futures = [pool.submit(run, i) for i in range(len(payloads))]
        index = {fut: i for i, fut in enumerate(futures)}
        bar = None
        if self.progress:
            try:
                from tqdm import tqdm

                bar = tqdm(total=len(futures), desc=desc or path, leave=False)
            except ImportError:
                bar = None
        results: List[Any] = [None] * len(futures)
        try:
            for fut in concurrent.futures.as_completed(futures):  # the first failure raises at once
                results[index[fut]] = fut.result()
                if bar is not None:
                    bar.update(1)
        except BaseException:
            for fut in futures:
                fut.cancel()
            self._abort_running(map_run, [f for f in futures if not f.done()])
            raise
        finally:
            if bar is not None:
                bar.close()
        return results

    def _abort_running(self, map_run: _MapRun, running: list, wait: float = 30.0) -> None:
        """After a failed map: marks it failed (no more attempts or retries), asks the servers to
        abort its attempts running now by rid (best effort, once each), and waits up to `wait`
        seconds for them to come back (each then fails without a retry)."""
        live = map_run.fail()
        if not running:
            return
        for url, rids in live.items():
            for rid in rids:
                try:
                    self._session().post(f"{url}/abort_request", json={"rid": rid},
                                         timeout=(min(5.0, self.connect_timeout), 5.0))
                except requests.RequestException:
                    break  # the server may be the one that failed: its other rids would wait too
        concurrent.futures.wait(running, timeout=wait)

    def broadcast(self, method: str, path: str, payload: Any = None, *,
                  validate: Optional[Callable[[str, Any], None]] = None,
                  timeout: Optional[float] = None, retries: Optional[int] = None,
                  urls: Optional[Sequence[str]] = None) -> Dict[str, Any]:
        """The same request to every server (concurrently), or to `urls` (some of them): {url:
        answer}. validate(url, answer) checks each answer. Raises the first server's SGLangError."""
        urls = list(self.urls if urls is None else urls)
        if not urls:
            return {}

        def run(u):
            check = None if validate is None else (lambda answer: validate(u, answer))
            return self.request(method, path, payload, url=u, validate=check, timeout=timeout,
                                retries=retries)

        if len(urls) == 1:
            return {urls[0]: run(urls[0])}
        pool = self._executor()
        futures = {u: pool.submit(run, u) for u in urls}
        return {u: f.result() for u, f in futures.items()}

    def submit(self, fn: Callable, *args):
        """Runs fn(*args) on the client's thread pool (for requests that must overlap other work,
        e.g. a weight broadcast); returns the Future."""
        return self._executor().submit(fn, *args)

    def health(self, url: str, timeout: float = 5.0) -> bool:
        """Whether GET url/health answers 200 (one attempt, no retries)."""
        try:
            return self._session().get(url.rstrip("/") + "/health", timeout=timeout).status_code == 200
        except requests.RequestException:
            return False
