"""`chalice local` for MAOF: Chalice's own local server, answering unknown routes with JSON 404.

Deployed, API Gateway's gateway responses do the same (see infra/).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import uuid
from collections.abc import MutableMapping
from typing import TYPE_CHECKING, Any

from chalice.cli.factory import CLIFactory
from chalice.local import (
    ChaliceRequestHandler,
    CustomLocalChalice,
    ForbiddenError,
    LocalChalice,
    LocalDevServer,
    LocalGatewayException,
    ThreadedHTTPServer,
)
from sqlalchemy.exc import OperationalError

from chalicelib.config import ConfigError, get_settings
from chalicelib.db import SchemaNotMigrated, check_migrated
from devstack.stack import PROJECT_DIR

if TYPE_CHECKING:
    from chalicelib.core.errors import ApiError

# What `chalice local` answers (403) for a path no route has, as API Gateway does: "Missing
# Authentication Token", or, when the request has an Authorization header, a SigV4 complaint
# that quotes the header (the caller's token) back.
_NO_ROUTE_MESSAGES = (b"Missing Authentication Token", b"Authorization header requires")

# A Content-Length value: ASCII digits alone (int() would also take "+5", " 5", "1_0").
_DIGITS = re.compile(r"[0-9]+")
# API Gateway refuses a body past 10 MB before any function runs; so does this server,
# without reading it (a length past what a read can take raised in Chalice's handler).
GATEWAY_MAX_BODY_BYTES = 10 * 1024 * 1024


# What the API function's connections wait at most on a lock and on a statement: here as
# deployed, so a request held by a hung worker's lock is answered 503 in seconds.
API_DATABASE_LIMITS = ("MAOF_DB_LOCK_TIMEOUT_MS", "MAOF_DB_STATEMENT_TIMEOUT_MS")


def api_database_limits() -> dict[str, str]:
    """API_DATABASE_LIMITS as .chalice/config.json sets them for the API function."""
    config = json.loads((PROJECT_DIR / ".chalice" / "config.json").read_text())
    api = config["stages"]["prod"]["lambda_functions"]["api_handler"]
    return {name: str(api["environment_variables"][name]) for name in API_DATABASE_LIMITS}


def limit_database_waits(environ: MutableMapping[str, str]) -> None:
    """Set the API function's database limits in `environ` (this process serves the API
    alone: the poller's workers have none), each unless set (empty is unset, as everywhere
    in the settings)."""
    for name, value in api_database_limits().items():
        if not environ.get(name):
            environ[name] = value


class MaofRequestHandler(ChaliceRequestHandler):
    """Turns `chalice local`'s 403 for unknown paths, with or without an Authorization
    header, into our 404 (what infra/template.json's MISSING_AUTHENTICATION_TOKEN gateway
    response answers deployed), and answers what http.server cannot read with the error
    envelope rather than its HTML (or, for a malformed Content-Length, a traceback)."""

    # Without TCP_NODELAY every keep-alive answer waits ~40 ms on delayed ACKs.
    disable_nagle_algorithm = True
    # Seconds a connection may sit idle (kept alive, or a request never finished) before it
    # is closed: without it each held a thread and a socket for as long as its client
    # kept it open. Every read and write of a socket must end within it; nothing MAOF
    # serves streams or long-polls.
    timeout = 30

    def __getattr__(self, name: str) -> Any:
        # http.server answers a method with no `do_<METHOD>` (TRACE, QUERY, ...) with an HTML
        # 501 of its own; through the app it gets the API's 405 envelope, as on any route.
        if name.startswith("do_"):
            return self._handle
        raise AttributeError(name)

    def _handle(self) -> None:
        """Hands the request to the app, once its body can be read as framed."""
        if "Transfer-Encoding" in self.headers:
            # Chalice's handler reads Content-Length bytes only: a chunked body's chunks
            # would be read as the next request. No MAOF client streams a body.
            self.send_error(411, "Send the body with a Content-Length, not chunked")
            return
        lengths = set(self.headers.get_all("Content-Length") or ())
        if len(lengths) > 1 or not all(_DIGITS.fullmatch(value) for value in lengths):
            self.send_error(400, "Content-Length must be one whole number of bytes")
            return
        if lengths and int(lengths.pop()) > GATEWAY_MAX_BODY_BYTES:
            from chalicelib.core import errors

            self.close_connection = True  # the body is not read
            too_large = errors.PayloadTooLarge(
                f"Request body exceeds {GATEWAY_MAX_BODY_BYTES} bytes"
            )
            self._send_envelope(413, too_large, str(uuid.uuid4()), Connection="close")
            return
        self._generic_handle()

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = do_PATCH = do_OPTIONS = _handle

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """What http.server refuses itself (a malformed request line or header, too many
        headers) and what `_handle` refuses, in the API's error envelope; the connection
        closes, as the rest of what was sent cannot be read as a request."""
        from chalicelib.core import errors

        self.log_error("code %d, message %s", code, message)
        self.close_connection = True
        version = str(getattr(self, "request_version", "HTTP/0.9"))
        if version == "HTTP/0.9":  # the request line was not read: no version
            self.request_version = "HTTP/1.1"  # (so send_response writes no status line)
        said = message or self.responses.get(code, ("Bad request",))[0]
        self._send_envelope(code, errors.BadRequest(said), str(uuid.uuid4()), Connection="close")

    def _send_envelope(self, status: int, error: ApiError, request_id: str, **headers: str) -> None:
        from chalicelib.core.encoding import dumps
        from chalicelib.http import error_body

        body = dumps(error_body(error, request_id))
        answer = {
            "Content-Type": "application/json",
            "X-Request-Id": request_id,
            "Access-Control-Allow-Origin": get_settings().cors_origin,
            **headers,
        }
        self._send_http_response(status, answer, body)

    def _send_http_response_with_body(
        self, code: int, headers: dict[str, Any], body: str | bytes
    ) -> None:
        if self.command != "HEAD":
            super()._send_http_response_with_body(code, headers, body)
            return
        # RFC 9110 9.3.2: a HEAD answer ends with its headers. A body after them would be
        # read, on a keep-alive connection, as the start of the next answer.
        size = len(body.encode() if isinstance(body, str) else body)
        self.send_response(code)
        self.send_header("Content-Length", str(size))
        self.send_header("Content-Type", headers.pop("Content-Type", "application/json"))
        self._send_headers(headers)

    def _send_error_response(self, error: LocalGatewayException) -> None:
        said = error.body or b""
        if isinstance(error, ForbiddenError) and any(m in said for m in _NO_ROUTE_MESSAGES):
            from chalicelib.core import errors

            request_id = error.headers.get("x-amzn-RequestId", "local")
            not_found = errors.NotFound(f"No route for {self.path}")
            self._send_envelope(404, not_found, request_id)
            return
        super()._send_error_response(error)


class MaofHTTPServer(ThreadedHTTPServer):
    """Chalice's threaded server, with a listen queue for a burst of clients: with the
    stdlib's 5, some connections of 20 to 30 clients arriving at once (faster than its one
    thread accepts them) were reset."""

    request_queue_size = 128


def create_server(host: str, port: int, stage: str = "dev") -> LocalDevServer:
    # A copy: Chalice writes the stage's environment_variables into the environ it is given,
    # and the process's own settings must stay as the caller set them.
    factory = CLIFactory(str(PROJECT_DIR), environ=dict(os.environ))
    config = factory.create_config_obj(chalice_stage_name=stage)
    app = config.chalice_app
    if not isinstance(app, LocalChalice):
        # What chalice.local.create_local_server does: thread-local current_request.
        CustomLocalChalice.__bases__ = (LocalChalice, app.__class__)
        app.__class__ = CustomLocalChalice
    return LocalDevServer(
        app, config, host, port, handler_cls=MaofRequestHandler, server_cls=MaofHTTPServer
    )


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m devstack.api")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=3000)
    parser.add_argument("--stage", default="dev")
    args = parser.parse_args()
    limit_database_waits(os.environ)
    try:
        get_settings()
        check_migrated()
    except (ConfigError, SchemaNotMigrated) as exc:
        print(f"maof: {exc}", file=sys.stderr)
        return 2
    except OperationalError as exc:  # psycopg's reason names the host, never the password
        reason = " ".join(str(exc.orig).split())
        print(f"maof: cannot connect to MAOF_DATABASE_URL: {reason}", file=sys.stderr)
        return 2
    server = create_server(args.host, args.port, args.stage)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
