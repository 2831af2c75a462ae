"""`python -m billing.stripe_local --host 127.0.0.1 --port 12111 [--api-key sk_test_local] [--state-file PATH]`"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from aiohttp import web

from .app import StripeLocalServer
from .delivery import WebhookDispatcher
from .state import State, StateFile


def parser_build() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m billing.stripe_local",
                                     description="A local Stripe-compatible API server for tests and demos.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=12111)
    parser.add_argument("--api-key", default=None,
                        help="accept only this secret key (default: any `sk_test_…` key)")
    parser.add_argument("--state-file", type=Path, default=None,
                        help="keep state in this JSON file across restarts (default: memory only)")
    parser.add_argument("--webhook-attempts", type=int, default=4,
                        help="delivery attempts per event and endpoint (default 4)")
    parser.add_argument("--webhook-backoff", type=float, default=1.0,
                        help="seconds before the first retry; doubles each time (default 1.0)")
    parser.add_argument("--webhook-timeout", type=float, default=10.0,
                        help="seconds an endpoint has to answer (default 10)")
    parser.add_argument("--access-log", action="store_true", help="log every request")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = parser_build().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    state = State()
    state_file = None
    if args.state_file is not None:
        state_file = StateFile(state, args.state_file)
        state_file.load()
    dispatcher = WebhookDispatcher(state, attempts=max(1, args.webhook_attempts), backoff_s=args.webhook_backoff,
                                   timeout_s=args.webhook_timeout)
    server = StripeLocalServer(api_key=args.api_key, state_file=state_file, dispatcher=dispatcher, state=state)
    web.run_app(server.app(), host=args.host, port=args.port, print=None,
                access_log=logging.getLogger("aiohttp.access") if args.access_log else None)
