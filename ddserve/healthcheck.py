"""`python -m ddserve.healthcheck`: exit status 0 when the local gateway answers `GET /healthz`;
with `--worker NAME`, when that worker's registration in Redis has a recent heartbeat.

The container health check of the gateway image and of docker-compose.yml, and the exec probes of
the worker pods (deploy/k8s/worker.yaml): a worker serves no HTTP, but its heartbeat thread
refreshes its RQ registration every `heartbeat_s`, so a registration older than a few periods
means the process is gone or hung. For a liveness probe (`--liveness`) a Redis that does not
answer counts as healthy: restarting every worker would not bring Redis back, and the workers
hold their jobs until it does. It reads the port and
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


WORKER_KEY_PREFIX = "rq:worker:"  # rq.Worker.redis_worker_namespace_prefix


def check_worker(
    redis_url: str, name: str, max_age_s: float, timeout_s: float, liveness: bool
) -> tuple[bool, str]:
    """(healthy, what was seen): healthy when worker `name` is registered with a heartbeat at
    most `max_age_s` old; with `liveness`, also when Redis does not answer."""
    from datetime import UTC, datetime

    import redis
    from rq.utils import utcparse

    connection = redis.Redis.from_url(
        redis_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
    )
    try:
        beat = connection.hget(WORKER_KEY_PREFIX + name, "last_heartbeat")
    except redis.RedisError as e:
        return liveness, f"worker {name}: Redis unavailable ({type(e).__name__})"
    finally:
        connection.close()
    if beat is None:
        return False, f"worker {name}: not registered (starting, or stopped)"
    age = (datetime.now(UTC) - utcparse(beat.decode()).replace(tzinfo=UTC)).total_seconds()
    return age <= max_age_s, f"worker {name}: last heartbeat {age:.1f} s ago (limit {max_age_s:g})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ddserve.healthcheck", description=__doc__)
    parser.add_argument("--url", help="check this URL instead of the configured gateway's")
    parser.add_argument("--worker", metavar="NAME", help="check this worker's heartbeat instead")
    parser.add_argument(
        "--max-age",
        type=float,
        default=None,
        help="--worker: oldest healthy heartbeat in seconds (default 6 x DDSERVE_HEARTBEAT_S)",
    )
    parser.add_argument(
        "--liveness", action="store_true", help="--worker: Redis unavailable counts as healthy"
    )
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds (default 3)")
    args = parser.parse_args(argv)
    if args.worker:
        settings = Settings()
        if settings.redis_url is None:
            parser.error("--worker needs DDSERVE_REDIS_URL")
        max_age = args.max_age if args.max_age is not None else 6 * settings.heartbeat_s
        healthy, seen = check_worker(
            settings.redis_url, args.worker, max_age, args.timeout, args.liveness
        )
    else:
        healthy, seen = check(args.url or healthz_url(Settings()), args.timeout)
    print(seen, file=sys.stdout if healthy else sys.stderr)
    return 0 if healthy else 1


if __name__ == "__main__":
    raise SystemExit(main())
