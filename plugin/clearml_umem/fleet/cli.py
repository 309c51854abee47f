"""The fleet's command line: `clearml-umem front ...` and the `--fleet` view of `clearml-umem ps`.

Where the routers are: `--routers URL,URL` (env UMEM_FLEET_ROUTERS), or `--clearml-project P`
(env UMEM_FLEET_PROJECT) with optional `--clearml-tags` (env UMEM_FLEET_TAGS): the running serve
tasks there. The routers' key is UMEM_API_KEY; the front asks its clients for the same key.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import Any

import httpx

from clearml_umem.fleet.discovery import ClearMLRouters, StaticRouters
from clearml_umem.fleet.probe import DEFAULT_PROBE_S, Discover, Fleet


class FleetUsage(ValueError):
    """A fleet setting that cannot work (exit 2)."""


def add_discovery_arguments(parser: argparse.ArgumentParser) -> None:
    env = os.environ
    parser.add_argument("--routers", default=env.get("UMEM_FLEET_ROUTERS"),
                        help="comma-separated router URLs (env UMEM_FLEET_ROUTERS)")
    parser.add_argument("--clearml-project", dest="fleet_project", default=env.get("UMEM_FLEET_PROJECT"),
                        help="find routers as the running serve tasks of this ClearML project (env UMEM_FLEET_PROJECT)")
    parser.add_argument("--clearml-tags", dest="fleet_tags", default=env.get("UMEM_FLEET_TAGS", ""),
                        help="with --clearml-project: only tasks with all these comma-separated tags "
                             "(env UMEM_FLEET_TAGS)")
    parser.add_argument("--probe-seconds", type=float,
                        default=float(env.get("UMEM_FLEET_PROBE_SECONDS") or DEFAULT_PROBE_S),
                        help=f"seconds between router status probes (default {DEFAULT_PROBE_S}, "
                             "env UMEM_FLEET_PROBE_SECONDS)")


def discovery_from_args(args: argparse.Namespace, required: bool = True) -> Discover | None:
    if args.routers and args.fleet_project:
        raise FleetUsage("give either --routers or --clearml-project, not both")
    if args.routers:
        try:
            return StaticRouters.parse(args.routers)
        except ValueError as exc:
            raise FleetUsage(f"--routers: {exc}") from None
    if args.fleet_project:
        tags = tuple(t.strip() for t in (args.fleet_tags or "").split(",") if t.strip())
        return ClearMLRouters(args.fleet_project, tags)
    if required:
        raise FleetUsage("where are the routers? give --routers URL,URL or --clearml-project PROJECT")
    return None


def add_front_command(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    front = sub.add_parser("front", help="one OpenAI URL in front of many routers: each request goes where its "
                                         "model is hot, else in RAM, else on disk, else the least loaded")
    add_discovery_arguments(front)
    front.add_argument("--host", default=os.environ.get("UMEM_FRONT_HOST", "127.0.0.1"),
                       help="listen address (default 127.0.0.1, env UMEM_FRONT_HOST)")
    front.add_argument("--port", type=int, default=int(os.environ.get("UMEM_FRONT_PORT") or 8080),
                       help="listen port, 0 picks a free one (default 8080, env UMEM_FRONT_PORT)")
    front.add_argument("--timeout", type=float, default=float(os.environ.get("UMEM_ROUTER_TIMEOUT_S") or 600),
                       help="seconds to wait for a router's answer (default 600: a cold start takes minutes; "
                            "env UMEM_ROUTER_TIMEOUT_S)")
    front.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"))
    front.set_defaults(func=run_front)


def run_front(args: argparse.Namespace) -> int:
    import logging

    from clearml_umem.fleet.front import READY_PREFIX, serve_front

    discover = discovery_from_args(args)
    assert discover is not None
    if args.probe_seconds <= 0 or args.timeout <= 0:
        raise FleetUsage("--probe-seconds and --timeout must be positive")
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    key = os.environ.get("UMEM_API_KEY") or None

    def ready(url: str) -> None:
        print(f"{READY_PREFIX}{url}", flush=True)

    try:
        asyncio.run(serve_front(discover, args.host, args.port, args.probe_seconds, args.timeout,
                                api_key=key, router_key=key, ready=ready))
    except OSError as exc:
        raise FleetUsage(f"cannot listen on {args.host}:{args.port}: {exc}") from None
    return 0


async def probe_once(discover: Discover, key: str | None, timeout_s: float) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with httpx.AsyncClient(trust_env=False) as client:
        fleet = Fleet(discover, client, probe_timeout_s=timeout_s, headers=headers)
        await fleet.refresh()
        return fleet.status()
