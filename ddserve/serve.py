"""`ddserve serve`: the gateway, embedded (no Redis needed) or in front of a real Redis.

- `DDSERVE_REDIS_URL` unset — the embedded mode (`ddserve.embedded.serve_embedded`): an in-process
  fakeredis server shared by the gateway and `--workers` worker threads, local image storage under
  `./var`, auth off (logged), every zoo model. The same code paths as production, in one process:
  `make serve`.
- `DDSERVE_REDIS_URL` set — the gateway only (`service.cli.run_gateway`; workers run apart:
  `ddserve worker`).

This module sits above the gateway and the workers (the embedded mode runs both); the gateway's
own server code is `service.cli`.
"""

from __future__ import annotations

import argparse

from ddserve.logs import configure_logging
from ddserve.settings import Settings
from service.cli import add_arguments as add_arguments
from service.cli import run_gateway


def run(args: argparse.Namespace) -> int:
    settings = Settings()
    if args.host is not None:
        settings.host = args.host
    if args.port is not None:
        settings.port = args.port
    configure_logging(settings.log_level, settings.log_json)
    if settings.embedded:
        from ddserve.embedded import serve_embedded  # loads torch: only in this mode

        return serve_embedded(settings, args.workers)
    return run_gateway(settings, args.workers)
