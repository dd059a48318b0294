"""`python -m ddserve.healthcheck`: exit status 0 when the local gateway answers `GET /healthz`.

The container health check of the gateway image and of docker-compose.yml. It reads the port and
bind address from `Settings` (`DDSERVE_PORT`, `DDSERVE_HOST`), the same values `ddserve serve` binds
to, so the check follows the configuration. Standard library HTTP only: it runs every few seconds
and must not import the gateway (nor torch).
"""

from __future__ import annotations

import argparse
import sys
import urllib.error
import urllib.request

from ddserve.settings import Settings

# A server bound to every interface is reached through loopback.
_WILDCARDS = {"0.0.0.0", "::", ""}


def healthz_url(settings: Settings) -> str:
    """URL of the gateway's liveness route on this host."""
    host = "127.0.0.1" if settings.host in _WILDCARDS else settings.host
    if ":" in host:  # an IPv6 literal
        host = f"[{host}]"
    return f"http://{host}:{settings.port}/healthz"


def check(url: str, timeout_s: float) -> tuple[bool, str]:
    """(healthy, what was seen): healthy only on a 200 answer."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as answer:
            return answer.status == 200, f"{url}: HTTP {answer.status}"
    except urllib.error.HTTPError as e:
        return False, f"{url}: HTTP {e.code}"
    except (urllib.error.URLError, OSError) as e:
        return False, f"{url}: {e}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ddserve.healthcheck", description=__doc__)
    parser.add_argument("--url", help="check this URL instead of the configured gateway's")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds (default 3)")
    args = parser.parse_args(argv)
    healthy, seen = check(args.url or healthz_url(Settings()), args.timeout)
    print(seen, file=sys.stdout if healthy else sys.stderr)
    return 0 if healthy else 1


if __name__ == "__main__":
    raise SystemExit(main())
