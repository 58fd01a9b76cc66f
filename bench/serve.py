"""`python -m bench.serve --app maof|bare --port N [--nodelay]`: an app behind Chalice's own
local server — MAOF exactly as `devstack.api` serves it, or the floor's one-route
Chalice app behind the same server.

`--nodelay` sets TCP_NODELAY on accepted connections (http.server's
`disable_nagle_algorithm`). Without it, Python's http.server writes a response's headers
and body in two packets, and Nagle's algorithm holds the body until the client's
delayed ACK of the headers: about 40 ms per keep-alive request on Linux, whatever the app.
"""

from __future__ import annotations

import argparse

from chalice.config import Config
from chalice.local import ChaliceRequestHandler, LocalDevServer

from bench.floors import bare_app


class _NoDelayHandler(ChaliceRequestHandler):
    disable_nagle_algorithm = True


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.serve")
    parser.add_argument("--app", choices=["maof", "bare"], required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--nodelay", action="store_true")
    args = parser.parse_args()
    if args.app == "maof":
        from devstack import api

        if args.nodelay:
            api.MaofRequestHandler.disable_nagle_algorithm = True
        server = api.create_server(args.host, args.port, stage="dev")
    else:
        config = Config.create(chalice_stage="dev", app_name="bare")
        handler = _NoDelayHandler if args.nodelay else ChaliceRequestHandler
        server = LocalDevServer(bare_app(), config, args.host, args.port, handler_cls=handler)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
