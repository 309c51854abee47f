"""`clearml-umem ps --fleet`: every router of the fleet, its device, its models, their tiers and load.

The routers come from `--routers` / `--clearml-project` (probed once, here), or else `--url` names a
front (`clearml-umem front`) whose `/fleet/status` is read."""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Callable
from typing import Any

import httpx

from clearml_umem.fleet.cli import add_discovery_arguments, discovery_from_args, probe_once


def add_fleet_to_ps(ps: argparse.ArgumentParser) -> None:
    """The hook on `ps`: `--fleet` and the discovery flags; without `--fleet`, ps is unchanged."""
    ps.add_argument("--fleet", action="store_true", help="the whole fleet: every router, its device, models, "
                                                         "tiers and load (--routers, --clearml-project, or --url "
                                                         "of a front)")
    add_discovery_arguments(ps)
    single: Callable[[argparse.Namespace], int] = ps.get_default("func")

    def run(args: argparse.Namespace) -> int:
        return run_fleet_ps(args) if args.fleet else single(args)

    ps.set_defaults(func=run)


def run_fleet_ps(args: argparse.Namespace) -> int:
    from clearml_umem.ops_cli import EXIT_UNREACHABLE, CommandFailed, router_base_url

    timeout = args.timeout if args.timeout is not None else 10.0
    key = args.admin_key or args.api_key
    discover = discovery_from_args(args, required=False)
    if discover is not None:
        status = asyncio.run(probe_once(discover, args.api_key, timeout))
    else:
        url = router_base_url(args.url) + "/fleet/status"
        try:
            resp = httpx.get(url, timeout=timeout, trust_env=False,
                             headers={"Authorization": f"Bearer {key}"} if key else {})
        except httpx.HTTPError as exc:
            raise CommandFailed(f"cannot reach the front at {args.url}: {exc}", EXIT_UNREACHABLE) from None
        if resp.status_code != 200:
            raise CommandFailed(f"{url}: HTTP {resp.status_code} (is {args.url} a clearml-umem front? "
                                "else give --routers or --clearml-project)")
        status = resp.json()
    print(json.dumps(status, indent=2) if args.json else format_fleet(status))
    return 0


def format_fleet(status: dict[str, Any]) -> str:
    rows = [["ROUTER", "DEVICE", "STATE", "MODEL", "TIER", "IN-FLIGHT", "WAITING"]]
    for r in status["routers"]:
        state = "up" if r["alive"] else f"gone ({(r.get('error') or '?')[:50]})"
        if not r["models"]:
            rows.append([r["url"], r["device"] or "-", state, "-", "-", "-", "-"])
        for m in r["models"]:
            tier = m["tier"] + (f" -> {m['moving_to']}" if m.get("moving_to") else "")
            rows.append([r["url"], r["device"] or "-", state, m["id"], tier, str(m["in_flight"]), str(m["waiting"])])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    alive = sum(1 for r in status["routers"] if r["alive"])
    lines.append(f"{alive} of {len(status['routers'])} router(s) up")
    return "\n".join(lines)
