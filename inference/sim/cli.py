"""Process entry point: parse arguments, pick the event loop, serve until signalled."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from .config import build_argument_parser, configs_from_args
from .http_server import serve


def main(argv: list[str] | None = None) -> None:
    args = build_argument_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config, settings = configs_from_args(args)
    if config.hardware_flags:
        logging.getLogger("inference.sim").info(
            "Accepted without effect on the simulator: %s",
            ", ".join(f"--{name.replace('_', '-')}" for name in config.hardware_flags))
    try:
        import uvloop  # optional: faster event loop
    except ImportError:
        uvloop = None

    async def serve_until_signalled() -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, task.cancel)
        try:
            await serve(config=config, settings=settings)
        except asyncio.CancelledError:
            pass

    if uvloop is not None:
        uvloop.run(serve_until_signalled())
    else:
        asyncio.run(serve_until_signalled())
    sys.exit(0)
