"""The MAOF API client: one method per endpoint, typed results, errors raised as MaofError.

    from maof_client import MaofClient

    client = MaofClient("http://127.0.0.1:3000")
    client.login("you@example.com", "yourpassword")
    run = client.execute({"name": "p", "stages": [...]}, {"text": "..."})
    print(client.wait_for_run(run.workflow_run_id).status)

Tokens live in a `TokenStore` (in memory by default; the CLI's is the credentials file).
An access token that has expired, or that the API refuses with 401, is replaced once
through `POST /auth/refresh` and the request sent again. Refresh tokens rotate: the new
pair is stored before it is used, and the store's lock makes sure no refresh token is
ever presented twice (the API would end the session).
"""

from __future__ import annotations

import base64
import contextlib
import functools
import json
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any, Protocol, TypeVar
from urllib.parse import quote

import requests

from maof_client import __version__
from maof_client.config import DEFAULT_API_URL
from maof_client.errors import (
    ConnectionFailed,
    MaofError,
    NotSignedIn,
    RequestFailed,
    TryLater,
    Unauthorized,
    UnexpectedResponse,
    error_from_envelope,
)
from maof_client.models import (
    Agent,
    AgentPage,
    AuditTrail,
    Health,
    Run,
    RunControl,
    RunPage,
    RunResult,
    SignIn,
    Stats,
    Submission,
    Tokens,
    User,
)

T = TypeVar("T")

# An access token this close to its expiry is refreshed before it is sent.
EXPIRY_MARGIN_SECONDS = 5
# wait_for_run outlasts an outage (an API restart, a deployment) this long, polling again
# after a delay doubling between these two unless the API says how long to wait.
OUTAGE_LIMIT_SECONDS = 60.0
OUTAGE_FIRST_DELAY_SECONDS = 1.0
OUTAGE_MAX_DELAY_SECONDS = 10.0


class TokenStore(Protocol):
    """Where a client keeps its token pair."""

    def load(self) -> Tokens | None: ...

    def save(self, tokens: Tokens) -> None: ...

    def clear(self) -> None: ...

    def exclusive(self) -> AbstractContextManager[None]:
        """Held while the pair is read, refreshed and saved again."""
        ...


class MemoryTokenStore:
    """Tokens held by this process only (the default)."""

    def __init__(self, tokens: Tokens | None = None) -> None:
        self._tokens = tokens
        self._lock = threading.Lock()

    def load(self) -> Tokens | None:
        return self._tokens

    def save(self, tokens: Tokens) -> None:
        self._tokens = tokens

    def clear(self) -> None:
        self._tokens = None

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._lock:
            yield


def access_token_expiry(token: str) -> int | None:
    """The `exp` claim of a JWT, read without verifying it (only the API can verify it;
    this only saves a request that would be refused); None if the token has none."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError):
        return None
    expiry = claims.get("exp") if isinstance(claims, dict) else None
    return int(expiry) if isinstance(expiry, int | float) else None


def _expired(token: str) -> bool:
    expiry = access_token_expiry(token)
    return expiry is not None and expiry <= time.time() + EXPIRY_MARGIN_SECONDS


def _failure_reason(exc: Exception) -> str:
    """`Connection refused` rather than urllib3's paragraph."""
    found = re.findall(r"\[Errno -?\d+\] ([^'\")]+)", str(exc))
    return found[-1].strip() if found else type(exc).__name__


def _object_data(envelope: dict[str, Any], status: int) -> dict[str, Any]:
    """The envelope's `data`, which MAOF's API always answers as an object."""
    data = envelope.get("data")
    if not isinstance(data, dict):
        raise UnexpectedResponse(
            f"The server answered HTTP {status} with "
            f"{'no data' if data is None else type(data).__name__ + ' data'} where MAOF's API "
            "answers an object: is this a MAOF API?",
            status=status,
        )
    return data


def _parsed(model: Callable[[dict[str, Any]], T], data: dict[str, Any], request: str) -> T:
    """`model` read from an answer's data; UnexpectedResponse when a field it needs is
    missing or of another type (an older API, or not a MAOF one)."""
    try:
        return model(data)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        reason = f"no {exc}" if isinstance(exc, KeyError) else f"{type(exc).__name__}: {exc}"
        raise UnexpectedResponse(
            f"The answer to {request} is not the data MAOF's API answers ({reason}): "
            "is this a MAOF API of this client's version?"
        ) from None


class MaofClient:
    """A client of one MAOF API (`base_url`, e.g. `http://127.0.0.1:3000`)."""

    def __init__(
        self,
        base_url: str = DEFAULT_API_URL,
        *,
        tokens: TokenStore | None = None,
        timeout: float = 30.0,
        session: requests.Session | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.tokens: TokenStore = tokens if tokens is not None else MemoryTokenStore()
        self.timeout = timeout
        self._http = session or requests.Session()
        self._http.headers["User-Agent"] = f"maof-client/{__version__}"

    # ------------------------------------------------------------------ transport

    def _send(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        token: str | None = None,
        attempts: int = 1,
    ) -> requests.Response:
        all_headers = dict(headers or {})
        if token is not None:
            all_headers["Authorization"] = f"Bearer {token}"
        query = {k: v for k, v in (params or {}).items() if v is not None}
        for attempt in range(1, attempts + 1):
            try:
                # Never followed: a 307/308 would post the body (a password, a refresh
                # token) again to whatever host its Location names.
                response = self._http.request(
                    method,
                    self.base_url + path,
                    json=body,
                    params=query or None,
                    headers=all_headers,
                    timeout=self.timeout,
                    allow_redirects=False,
                )
            except requests.Timeout as exc:
                failure: MaofError = ConnectionFailed(
                    f"The MAOF API at {self.base_url} did not answer {method} {path} "
                    f"within {self.timeout:g} s"
                )
                cause: Exception = exc
            except requests.ConnectionError as exc:
                failure = ConnectionFailed(
                    f"Could not reach the MAOF API at {self.base_url}: {_failure_reason(exc)}"
                )
                cause = exc
            except requests.RequestException as exc:  # not worth sending again
                raise RequestFailed(
                    f"{method} {path} to the MAOF API at {self.base_url} failed: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            else:
                if 300 <= response.status_code < 400:
                    raise UnexpectedResponse(
                        f"The server at {self.base_url} answered {method} {path} with HTTP "
                        f"{response.status_code}, a redirect to "
                        f"{response.headers.get('Location') or '(no Location)'}; not followed "
                        "(it would carry the request elsewhere): if that is the API, use its "
                        "URL (MAOF_API_URL or --api-url)",
                        status=response.status_code,
                    )
                return response
            if attempt < attempts:
                time.sleep(0.5 * attempt)
        raise failure from cause

    @staticmethod
    def _parse(response: requests.Response, *, data_on_error: bool = False) -> Any:
        """The envelope's `data`; its error raised as a MaofError."""
        try:
            envelope = response.json()
        except ValueError:
            raise UnexpectedResponse(
                f"The server answered HTTP {response.status_code} with something that is not "
                "JSON: is this a MAOF API?",
                status=response.status_code,
            ) from None
        if isinstance(envelope, dict) and envelope.get("success") is True:
            return _object_data(envelope, response.status_code)
        if data_on_error and isinstance(envelope, dict) and envelope.get("data") is not None:
            return _object_data(envelope, response.status_code)
        error = error_from_envelope(
            envelope, response.status_code, response.headers.get("Retry-After")
        )
        if error.request_id is None:
            error.request_id = response.headers.get("X-Request-Id")
        raise error

    def _call(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        auth: bool = True,
        refresh_on_401: bool = True,
        attempts: int = 1,
        data_on_error: bool = False,
    ) -> Any:
        """Send one request and answer its data; with `auth`, as the stored session,
        refreshing its tokens once when they have expired or are refused."""
        send = functools.partial(
            self._send, method, path, body=body, params=params, headers=headers, attempts=attempts
        )
        if not auth:
            return self._parse(send(), data_on_error=data_on_error)
        tokens = self._signed_in()
        if _expired(tokens.access_token):
            tokens = self._refresh(tokens)
        response = send(token=tokens.access_token)
        if response.status_code == 401 and refresh_on_401:
            tokens = self._refresh(tokens)
            response = send(token=tokens.access_token)
        return self._parse(response, data_on_error=data_on_error)

    def _read(
        self, model: Callable[[dict[str, Any]], T], method: str, path: str, **kwargs: Any
    ) -> T:
        """`_call`, its data read as `model` (UnexpectedResponse when it does not fit)."""
        return _parsed(model, self._call(method, path, **kwargs), f"{method} {path}")

    def _signed_in(self) -> Tokens:
        tokens = self.tokens.load()
        if tokens is None:
            raise NotSignedIn(f"Not signed in to {self.base_url}")
        return tokens

    def _refresh(self, stale: Tokens) -> Tokens:
        """A fresh pair for `stale`: from the store when another client already rotated it,
        else from `POST /auth/refresh`, saved before it is returned."""
        with self.tokens.exclusive():
            current = self.tokens.load()
            if current is None:
                raise NotSignedIn(f"Not signed in to {self.base_url}")
            if current.refresh_token != stale.refresh_token:
                return current  # rotated meanwhile by another process or thread
            try:
                data = self._call(
                    "POST",
                    "/auth/refresh",
                    body={"refreshToken": current.refresh_token},
                    auth=False,
                )
            except Unauthorized as exc:
                self.tokens.clear()  # that session has ended: its tokens are worthless
                raise NotSignedIn(
                    f"The session at {self.base_url} has ended ({exc.message})",
                    request_id=exc.request_id,
                    status=exc.status,
                ) from exc
            signed = _parsed(SignIn.from_api, data, "POST /auth/refresh")
            self.tokens.save(signed.tokens)
            return signed.tokens

    # ------------------------------------------------------------------ health and docs

    def health(self) -> Health:
        """`GET /health`: answered also when degraded (HTTP 503), with `status: degraded`."""
        return self._read(Health.from_api, "GET", "/health", auth=False, data_on_error=True)

    def stats(self) -> Stats:
        """`GET /stats`: your runs active in the last hour and their stages by status, and per agent
        its completed and failed stages with their p50/p95 durations."""
        return self._read(Stats.from_api, "GET", "/stats")

    def openapi(self) -> dict[str, Any]:
        """`GET /openapi`: the API's OpenAPI document (not enveloped)."""
        response = self._send("GET", "/openapi")
        if not response.ok:
            self._parse(response)
        try:
            return dict(response.json())
        except ValueError:
            raise UnexpectedResponse(
                "GET /openapi did not answer JSON", status=response.status_code
            ) from None

    # ------------------------------------------------------------------ accounts and sessions

    def register(self, email: str, password: str, name: str) -> User:
        """`POST /auth/register`: create an account (does not sign in)."""
        body = {"email": email, "password": password, "name": name}
        return self._read(User.from_api, "POST", "/auth/register", body=body, auth=False)

    def login(self, email: str, password: str) -> SignIn:
        """`POST /auth/login`: start a session and keep its tokens in the token store."""
        body = {"email": email, "password": password}
        signed = self._read(SignIn.from_api, "POST", "/auth/login", body=body, auth=False)
        with self.tokens.exclusive():
            self.tokens.save(signed.tokens)
        return signed

    def refresh(self) -> Tokens:
        """`POST /auth/refresh` now (requests refresh by themselves when they need to)."""
        return self._refresh(self._signed_in())

    def logout(self) -> int:
        """`POST /auth/logout`: end this session (its access tokens too) and forget its
        tokens; answers how many sessions ended (0 when it had already ended)."""
        tokens = self.tokens.load()
        if tokens is None:
            return 0
        with self.tokens.exclusive():
            ended = self._read(
                _sessions_ended,
                "POST",
                "/auth/logout",
                body={"refreshToken": tokens.refresh_token},
                auth=False,
            )
            self.tokens.clear()
        return ended

    def logout_all(self) -> int:
        """`POST /auth/logout-all`: end every session of this user, here and elsewhere."""
        ended = self._read(_sessions_ended, "POST", "/auth/logout-all")
        with self.tokens.exclusive():
            self.tokens.clear()
        return ended

    def change_password(self, current_password: str, new_password: str) -> SignIn:
        """`POST /auth/password`: every other session ends; this one gets a fresh pair."""
        body = {"currentPassword": current_password, "newPassword": new_password}
        # A wrong current password is a 401 too: that one is not a reason to refresh.
        signed = self._read(
            SignIn.from_api, "POST", "/auth/password", body=body, refresh_on_401=False
        )
        with self.tokens.exclusive():
            self.tokens.save(signed.tokens)
        return signed

    def me(self) -> User:
        """`GET /auth/me`: the signed-in user."""
        return self._read(User.from_api, "GET", "/auth/me")

    # ------------------------------------------------------------------ agents

    def register_agent(
        self,
        agent_id: str,
        name: str,
        endpoint: str,
        auth_token: str,
        capabilities: list[str],
        *,
        description: str | None = None,
        max_concurrent_tasks: int | None = None,
        visibility: str | None = None,
    ) -> Agent:
        """`POST /agents/register`: its health is checked at once (`status`)."""
        body: dict[str, Any] = {
            "agentId": agent_id,
            "name": name,
            "endpoint": endpoint,
            "authToken": auth_token,
            "capabilities": capabilities,
        }
        optional = {
            "description": description,
            "maxConcurrentTasks": max_concurrent_tasks,
            "visibility": visibility,
        }
        body.update({k: v for k, v in optional.items() if v is not None})
        return self._read(Agent.from_api, "POST", "/agents/register", body=body)

    def list_agents(
        self,
        *,
        capability: str | None = None,
        status: str | None = None,
        page: int | None = None,
        limit: int | None = None,
    ) -> AgentPage:
        """`GET /agents`: your agents and shared ones, one page."""
        params = {"capability": capability, "status": status, "page": page, "limit": limit}
        return self._read(AgentPage.from_api, "GET", "/agents", params=params)

    def find_agent(self, agent_id: str) -> Agent | None:
        """The agent you can see whose `agentId` is `agent_id` (pages through the list):
        yours if you have one (agentIds are per account), else a shared one."""
        page, shared = 1, None
        while True:
            listed = self.list_agents(page=page, limit=100)
            for agent in listed.agents:
                if agent.agent_id == agent_id:
                    if agent.owner_user_uuid is not None:  # shown to its owner only
                        return agent
                    shared = shared or agent
            if page >= listed.meta.pages:
                return shared
            page += 1

    def get_agent(self, agent_uuid: str) -> Agent:
        """`GET /agents/{agentUuid}`."""
        return self._read(Agent.from_api, "GET", f"/agents/{_segment(agent_uuid)}")

    def update_agent(self, agent_uuid: str, *, visibility: str) -> Agent:
        """`PATCH /agents/{agentUuid}`: `private` or `shared` (sharing needs an admin)."""
        body = {"visibility": visibility}
        return self._read(Agent.from_api, "PATCH", f"/agents/{_segment(agent_uuid)}", body=body)

    def check_agent_health(self, agent_uuid: str) -> Agent:
        """`POST /agents/{agentUuid}/health-check`: probe it now; the agent with its status."""
        path = f"/agents/{_segment(agent_uuid)}/health-check"
        return self._read(Agent.from_api, "POST", path)

    def delete_agent(self, agent_uuid: str) -> dict[str, Any]:
        """`DELETE /agents/{agentUuid}`: once this returns, the agent gets no new stage."""
        return dict(self._call("DELETE", f"/agents/{_segment(agent_uuid)}"))

    # ------------------------------------------------------------------ workflow runs

    def execute(
        self,
        workflow: dict[str, Any],
        input: Any = None,
        *,
        callback: dict[str, str] | None = None,
        idempotency_key: str | None = None,
    ) -> Submission:
        """`POST /workflows/execute`: submit `workflow` ({name, stages, timeoutMs?}).

        With an `idempotency_key` (per user, kept 24 h) the request is sent again when no
        answer came back (a time-out, a dropped connection): the API answers the same run
        for the same key and body, so a retry never makes a second run. Pass
        `idempotency_key=new_idempotency_key()` to get that without choosing a key.
        """
        body: dict[str, Any] = {"workflow": workflow, "input": input}
        if callback is not None:
            body["callback"] = callback
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        return self._read(
            Submission.from_api,
            "POST",
            "/workflows/execute",
            body=body,
            headers=headers,
            attempts=3 if idempotency_key else 1,
        )

    def list_runs(
        self, *, status: str | None = None, page: int | None = None, limit: int | None = None
    ) -> RunPage:
        """`GET /workflows`: your runs, newest first, one page."""
        params = {"status": status, "page": page, "limit": limit}
        return self._read(RunPage.from_api, "GET", "/workflows", params=params)

    def get_run(self, run_id: str) -> Run:
        """`GET /workflows/{runId}`: status, progress and every stage."""
        return self._read(Run.from_api, "GET", f"/workflows/{_segment(run_id)}")

    def get_result(self, run_id: str) -> RunResult:
        """`GET /workflows/{runId}/result`: a completed run's output (NotFound before)."""
        return self._read(RunResult.from_api, "GET", f"/workflows/{_segment(run_id)}/result")

    def cancel_run(self, run_id: str) -> RunControl:
        """`POST /workflows/{runId}/cancel`: end a queued or running run (Conflict once it
        has ended)."""
        return self._read(RunControl.from_api, "POST", f"/workflows/{_segment(run_id)}/cancel")

    def retry_run(self, run_id: str) -> RunControl:
        """`POST /workflows/{runId}/retry`: run a failed or cancelled run again from where it
        stopped, under the same id (Conflict otherwise)."""
        return self._read(RunControl.from_api, "POST", f"/workflows/{_segment(run_id)}/retry")

    def get_audit(self, run_id: str) -> AuditTrail:
        """`GET /workflows/{runId}/audit`: the entries and the API's verification of their
        hash chain (`chain.valid`, `chain.head`)."""
        return self._read(AuditTrail.from_api, "GET", f"/workflows/{_segment(run_id)}/audit")

    def export_audit(self, run_id: str) -> Any:
        """`GET /workflows/{runId}/audit/export`: a run's audit trail as one bundle to verify
        offline (`maof-verify`): the run, its signed entries, the public keys, the stage
        outputs with their hashes and, once checkpointed, the signed tree head and the
        inclusion proof."""
        return self._call("GET", f"/workflows/{_segment(run_id)}/audit/export")

    def audit_keys(self) -> list[dict[str, Any]]:
        """`GET /audit/keys`: the public keys (JWK) audit entries are signed with."""
        return self._read(_keys, "GET", "/audit/keys", auth=False)

    def wait_for_run(
        self,
        run_id: str,
        *,
        timeout: float | None = None,
        on_update: Callable[[Run], None] | None = None,
        min_interval: float = 0.25,
        max_interval: float = 2.0,
        on_retry: Callable[[MaofError, float], None] | None = None,
        outage_limit: float = OUTAGE_LIMIT_SECONDS,
    ) -> Run:
        """Poll the run until it has ended (completed, failed or cancelled) and return it.

        `on_update` sees every poll. Polls start every `min_interval` seconds and back off
        to `max_interval` while nothing changes; raises TimeoutError after `timeout`.
        A poll that fails for a passing reason (see `transient`: the API restarting, a
        proxy's 502, a 503 or 429) is sent again after its Retry-After, else after a delay
        doubling from 1 s to 10 s; `on_retry` sees each such error and the delay. The
        error is raised once polls have failed for `outage_limit` seconds in a row, or
        at once when it is not transient."""
        deadline = None if timeout is None else time.monotonic() + timeout
        interval = min_interval
        seen: tuple[Any, ...] = ()
        failing_since: float | None = None
        backoff = OUTAGE_FIRST_DELAY_SECONDS
        while True:
            try:
                run = self.get_run(run_id)
            except MaofError as error:
                failed_at = time.monotonic()
                failing_since = failed_at if failing_since is None else failing_since
                asked = error.retry_after if isinstance(error, TryLater) else None
                delay = backoff if asked is None else max(asked, min_interval)
                backoff = min(backoff * 2, OUTAGE_MAX_DELAY_SECONDS)
                out_of_time = failed_at + delay > failing_since + outage_limit or (
                    deadline is not None and failed_at + delay > deadline
                )
                if not transient(error) or out_of_time:
                    raise
                if on_retry is not None:
                    on_retry(error, delay)
                time.sleep(delay)
                continue
            failing_since, backoff = None, OUTAGE_FIRST_DELAY_SECONDS
            if on_update is not None:
                on_update(run)
            if run.ended:
                return run
            now = (run.status, tuple((s.stage_id, s.status, s.attempt) for s in run.stages))
            interval = min_interval if now != seen else min(interval * 1.5, max_interval)
            seen = now
            if deadline is not None and time.monotonic() + interval > deadline:
                raise TimeoutError(f"{run_id} is still {run.status} after {timeout:g} s")
            time.sleep(interval)


def transient(error: MaofError) -> bool:
    """Whether asking again later may well succeed: no answer (the API restarting or
    unreachable), an answer asking to wait (429, 503), or a 5xx that is not the API's own
    (a proxy's 502 or 504 while the API is away)."""
    if isinstance(error, ConnectionFailed | TryLater):
        return True
    return isinstance(error, UnexpectedResponse) and (error.status or 0) >= 500


def _sessions_ended(data: dict[str, Any]) -> int:
    return int(data.get("sessionsEnded", 0))


def _keys(data: dict[str, Any]) -> list[dict[str, Any]]:
    keys = data["keys"]
    if not isinstance(keys, list):
        raise TypeError(f"keys is {type(keys).__name__}, not a list")
    return keys


def new_idempotency_key() -> str:
    return str(uuid.uuid4())


def _segment(value: str) -> str:
    """A path parameter, escaped so it stays one segment."""
    return quote(value, safe="")
