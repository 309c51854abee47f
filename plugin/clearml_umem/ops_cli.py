"""`clearml-umem ps | place | logs`: the operator's commands against a running router.

Same conventions as an OpenAI client: the router's URL from `--url` or `UMEM_ROUTER_URL`,
the keys from `--api-key` / `--admin-key` or `UMEM_API_KEY` / `UMEM_ADMIN_KEY` (the admin
routes take the admin key when one is given, else the API key). Exit codes a script can
rely on: 0 done, 1 the router refused or the request failed (its message is printed),
2 usage, 3 the router cannot be reached.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import httpx

from clearml_umem.config import ServeConfig
from clearml_umem.tiers import ALL_TIERS

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3

FOLLOW_PERIOD_S = 1.0
"""How often `logs -f` asks for new lines."""
PLACE_TIMEOUT_S = 1900.0
"""A little over the router's own limit on a placement (30 min), so the router's answer comes first."""


class CommandFailed(Exception):
    """The router answered with an error, or did not answer; `code` is the exit code."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


def default_url(env: dict[str, str] | None = None) -> str:
    env = dict(os.environ) if env is None else env
    return env.get("UMEM_ROUTER_URL") or f"http://127.0.0.1:{ServeConfig().port}"


def add_ops_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ps, place and logs on the `clearml-umem` parser."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=default_url(), help="router URL (env UMEM_ROUTER_URL)")
    common.add_argument("--api-key", default=os.environ.get("UMEM_API_KEY"), help="(env UMEM_API_KEY)")
    common.add_argument("--admin-key", default=os.environ.get("UMEM_ADMIN_KEY"),
                        help="for the admin routes when the router has one (env UMEM_ADMIN_KEY)")
    common.add_argument("--json", action="store_true", help="print the router's JSON, for scripts")
    common.add_argument("--timeout", type=float, default=None, help="seconds to wait for the router")

    ps = sub.add_parser("ps", parents=[common], help="the models of a running router: tier, moves, memory")
    ps.set_defaults(func=run_ps)
    place = sub.add_parser("place", parents=[common],
                           help="move a model to a tier (pre-warm or evict) and wait; prints what moved")
    place.add_argument("model")
    place.add_argument("tier", choices=[t.value for t in ALL_TIERS])
    place.set_defaults(func=run_place)
    logs = sub.add_parser("logs", parents=[common], help="a model's engine log (the router's lines about it for "
                                                         "in-process engines)")
    logs.add_argument("model")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing new lines until interrupted")
    logs.set_defaults(func=run_logs)


def _client(args: argparse.Namespace, timeout: float) -> httpx.Client:
    key = args.admin_key or args.api_key
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=args.url.rstrip("/"), headers=headers,
                        timeout=args.timeout if args.timeout is not None else timeout)


def _call(client: httpx.Client, method: str, path: str, **kwargs: Any) -> Any:
    try:
        resp = client.request(method, path, **kwargs)
    except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
        raise CommandFailed(f"cannot reach the router at {client.base_url}: {exc}", EXIT_UNREACHABLE) from None
    except httpx.TimeoutException:
        raise CommandFailed(f"the router at {client.base_url} did not answer {method} {path} in time "
                            "(--timeout)") from None
    except httpx.HTTPError as exc:
        raise CommandFailed(f"{method} {path} failed: {exc}", EXIT_UNREACHABLE) from None
    if resp.status_code >= 400:
        raise CommandFailed(f"HTTP {resp.status_code}: {_error_message(resp)}")
    try:
        return resp.json()
    except ValueError:
        raise CommandFailed(f"{method} {path}: the answer is not JSON; is {client.base_url} a clearml-umem "
                            "router?") from None


def _error_message(resp: httpx.Response) -> str:
    try:
        error = resp.json()["error"]
        return str(error["message"]) + (f" (param: {error['param']})" if error.get("param") else "")
    except (ValueError, KeyError, TypeError):
        return resp.text[:300] or resp.reason_phrase


def _size(n: int | None) -> str:
    if not n:
        return "-"
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def _ago(iso: str | None) -> str:
    if not iso:
        return "never"
    seconds = (datetime.now(timezone.utc) - datetime.fromisoformat(iso)).total_seconds()
    if seconds < 90:
        return f"{seconds:.0f} s ago"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def _moving(row: dict[str, Any]) -> str:
    move = row.get("move")
    if not row.get("moving_to"):
        return "-"
    if not move:
        return f"-> {row['moving_to']}"
    text = f"-> {move['dst']} {move['elapsed_s']:.0f}s"
    if move.get("percent") is not None:
        text += f" {move['percent']:.0f}%"
    return text


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def format_ps(data: dict[str, Any]) -> str:
    header = ["MODEL", "TIER", "MOVING", "IN-FLIGHT", "WAITING", "DEVICE", "HOST", "LAST USED", "MOVES",
              "LAST ERROR"]
    rows = [header]
    for m in data["data"]:
        error = (m.get("last_error") or "-").splitlines()[0][:60]
        rows.append([m["name"], m["tier"], _moving(m), str(m["in_flight"]), str(m["waiting"]),
                     _size(m["device_bytes"]), _size(m["host_bytes"]), _ago(m.get("last_used")),
                     str(m.get("moves", 0)), error])
    mem = data.get("memory") or {}
    footer = (f"device {_size(mem.get('device_used'))} of {_size(mem.get('device_budget'))}, "
              f"host {_size(mem.get('host_used'))} of {_size(mem.get('host_budget'))}")
    return _table(rows) + "\n" + footer


def run_ps(args: argparse.Namespace) -> int:
    with _client(args, 10.0) as client:
        data = _call(client, "GET", "/admin/models")
    print(json.dumps(data, indent=2) if args.json else format_ps(data))
    return EXIT_OK


def format_move(move: dict[str, Any]) -> str:
    if not move["ok"]:
        return f"  {move['model']}: {move['src']} -> {move['dst']} FAILED: {move['error']}"
    speed = f", {move['gbps']:.2f} GB/s" if move["bytes"] and move["seconds"] else ""
    copy = f", host copy {move['host_copy']}" if move.get("host_copy") else ""
    return (f"  {move['model']}: {move['src']} -> {move['dst']} in {move['seconds']:.3f} s "
            f"({move['bytes'] / 1e9:.3f} GB{speed}{copy})")


def run_place(args: argparse.Namespace) -> int:
    with _client(args, PLACE_TIMEOUT_S) as client:
        before = _call(client, "GET", "/admin/status")
        seen = max((m["seq"] for m in before["moves"]), default=0)
        started = time.monotonic()
        row = _call(client, "POST", f"/admin/models/{args.model}/place", json={"tier": args.tier})
        seconds = time.monotonic() - started
        moves = _call(client, "GET", "/admin/status", params={"after": seen})["moves"]
    if args.json:
        print(json.dumps({"model": row, "seconds": seconds, "moves": moves}, indent=2))
        return EXIT_OK
    verb = "already in" if not moves else "placed in"
    print(f"{args.model}: {verb} {row['tier']} ({seconds:.2f} s)")
    for move in moves:
        print(format_move(move))
    return EXIT_OK


def run_logs(args: argparse.Namespace, sleep: Callable[[float], None] = time.sleep) -> int:
    path = f"/admin/models/{args.model}/logs"
    with _client(args, 10.0) as client:
        data = _call(client, "GET", path)
        _print_log(data, args.json, first=True)
        while args.follow:
            sleep(FOLLOW_PERIOD_S)
            data = _call(client, "GET", path, params={"offset": data["next_offset"]})
            _print_log(data, args.json, first=False)
    return EXIT_OK


def _print_log(data: dict[str, Any], as_json: bool, first: bool) -> None:
    if as_json:
        print(json.dumps(data), flush=True)
        return
    if first:
        where = f"log file {data['path']}" if data.get("path") else "no log file"
        print(f"# {data['model']}: {where}" + (f"; {data['note']}" if data.get("note") else ""),
              file=sys.stderr, flush=True)
    if data["text"]:
        sys.stdout.write(data["text"])
        sys.stdout.flush()
