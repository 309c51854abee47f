"""`clearml-umem ps | place | logs`: the operator's commands against a running router.

Same conventions as an OpenAI client: the router's URL from `--url` or `UMEM_ROUTER_URL`
(the OpenAI base URL `http://host:port/v1` works too, and a missing scheme means http),
the keys from `--api-key` / `--admin-key` or `UMEM_API_KEY` / `UMEM_ADMIN_KEY` (the admin
routes take the admin key when one is given, else the API key). Errors say what to type,
not which HTTP header was missing. Exit codes a script can rely on: 0 done, 1 the router
refused or the request failed (its message is printed), 2 usage, 3 the router cannot be
reached.
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
from clearml_umem.units import fmt_bytes, fmt_gbps, fmt_seconds

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


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Each option's default shown beside it (never a key's: it would print a secret); the epilog's
    examples and environment variables kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("default" in text or default in (None, False, [], "") or default is argparse.SUPPRESS
                or action.dest in ("api_key", "admin_key", "help", "version")):
            return text
        return f"{text} (default: {default})"


OPS_ENVIRONMENT = """environment variables:
  UMEM_ROUTER_URL   the router's URL, as --url (default http://127.0.0.1:8000)
  UMEM_API_KEY      the router's API key, as --api-key
  UMEM_ADMIN_KEY    the router's admin key, as --admin-key (the admin routes take only it when the router has one)
"""

PS_EXAMPLES = """examples:
  clearml-umem ps
  clearml-umem ps --url http://gpu-box:8000/v1 --admin-key "$UMEM_ADMIN_KEY"
  clearml-umem ps --json | jq '.data[] | {name, tier}'

columns: TIER is where the weights are (gpu = hot, ram, disk, cold); PROCESSOR what runs a hot model
(100% GPU, or 100% CPU on a machine without one); SIZE the weights on disk; CONTEXT the tokens served;
DEVICE and HOST the memory the model holds now (mid-move: what the move reserves); UNTIL when, unused,
it moves down a tier (--keep-alive), "forever" when it never does.
"""

PLACE_EXAMPLES = """examples:
  clearml-umem place qwen gpu      pre-warm: load qwen on the GPU now (others move off to make room)
  clearml-umem place qwen ram      evict to pinned host RAM (a swap-in later copies it back)
  clearml-umem place qwen cold     stop its engine and free everything
"""

LOGS_EXAMPLES = """examples:
  clearml-umem logs qwen           the last lines: its engine's log file, or the router's lines about it
  clearml-umem logs qwen -f        keep printing new lines (moves, their progress, errors) until Ctrl-C
  clearml-umem logs qwen --json    the raw answer: text, offset and next_offset (ask again with offset=next_offset)
"""


def add_ops_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ps, place and logs on the `clearml-umem` parser."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=default_url(),
                        help="the router: http://host:port, host:port, or an OpenAI base URL ending in /v1 "
                             "(env UMEM_ROUTER_URL)")
    common.add_argument("--api-key", default=os.environ.get("UMEM_API_KEY"),
                        help="the router's API key (env UMEM_API_KEY)")
    common.add_argument("--admin-key", default=os.environ.get("UMEM_ADMIN_KEY"),
                        help="for the admin routes when the router has one (env UMEM_ADMIN_KEY)")
    common.add_argument("--json", action="store_true", help="print the router's JSON, for scripts")
    common.add_argument("--timeout", type=float, default=None,
                        help="seconds to wait for the router (default: 10; place: until the move ends)")

    ps = sub.add_parser("ps", parents=[common], formatter_class=HelpFormatter,
                        help="the models of a running router: tier, size, engine, context, memory, expiry",
                        description="List the models of a running router, as `ollama ps` does.",
                        epilog=PS_EXAMPLES + "\n" + OPS_ENVIRONMENT)
    ps.set_defaults(func=run_ps)
    tiers = [t.value for t in ALL_TIERS]
    place = sub.add_parser("place", parents=[common], formatter_class=HelpFormatter,
                           help="move a model to a tier (pre-warm or evict) and wait; prints what moved",
                           description="Move a model to a tier and wait until it is there; prints every move "
                                       "that happened for it (models moved off to make room included).",
                           epilog=PLACE_EXAMPLES + "\n" + OPS_ENVIRONMENT)
    place.add_argument("model", help="a model name, as `clearml-umem ps` lists them")
    place.add_argument("tier", choices=tiers, help=f"where to put it: {', '.join(tiers)}")
    place.set_defaults(func=run_place)
    logs = sub.add_parser("logs", parents=[common], formatter_class=HelpFormatter,
                          help="a model's log: its engine's file, or the router's lines about it (moves and their "
                               "progress) for in-process engines",
                          description="Print a model's log: its engine process's log file (vLLM, llama-server), "
                                      "or for in-process engines (transformers) the router's lines about it: its "
                                      "moves, their progress every 2 s, errors.",
                          epilog=LOGS_EXAMPLES + "\n" + OPS_ENVIRONMENT)
    logs.add_argument("model", help="a model name, as `clearml-umem ps` lists them")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing new lines until interrupted")
    logs.set_defaults(func=run_logs)


def router_base_url(raw: str) -> str:
    """The router's root from what a user types: `host:port` (http assumed), `http://host:port`, or
    the OpenAI base URL `http://host:port/v1` that clients are configured with."""
    text = raw.strip()
    if not text:
        raise CommandFailed("--url is empty; give the router's address, e.g. http://127.0.0.1:8000", EXIT_USAGE)
    if "://" not in text:
        text = "http://" + text
    scheme = text.split("://", 1)[0].lower()
    if scheme not in ("http", "https"):
        raise CommandFailed(f"--url {raw!r}: the router speaks http or https, not {scheme}", EXIT_USAGE)
    text = text.rstrip("/")
    if text.endswith("/v1"):
        text = text[:-3]
    return text


def _client(args: argparse.Namespace, timeout: float) -> httpx.Client:
    key = args.admin_key or args.api_key
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=router_base_url(args.url), headers=headers,
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
        raise CommandFailed(f"HTTP {resp.status_code}: {_advice(client, resp)}")
    try:
        return resp.json()
    except ValueError:
        raise CommandFailed(f"{method} {path}: the answer is not JSON; is {client.base_url} a clearml-umem "
                            "router?") from None


def _advice(client: httpx.Client, resp: httpx.Response) -> str:
    """The router's refusal, said in the CLI's words: which flag or variable to use, which command lists what."""
    code = _error_code(resp)
    if resp.status_code == 401:
        return ("the router refused the key: give its admin key with --admin-key or UMEM_ADMIN_KEY (or, when it has "
                "no admin key, its API key with --api-key or UMEM_API_KEY)")
    if code == "model_not_found":
        message = _error_message(resp).split(";")[0]
        return f"{message}; `clearml-umem ps` lists the models this router serves"
    if resp.status_code == 404:
        return (f"{client.base_url} has no {resp.request.url.path}: is it a clearml-umem router? Give its root or "
                "its OpenAI base URL (http://host:port or http://host:port/v1)")
    return _error_message(resp)


def _error_code(resp: httpx.Response) -> str | None:
    try:
        return resp.json()["error"].get("code")
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def _error_message(resp: httpx.Response) -> str:
    try:
        error = resp.json()["error"]
        return str(error["message"]) + (f" (param: {error['param']})" if error.get("param") else "")
    except (ValueError, KeyError, TypeError):
        return resp.text[:300] or resp.reason_phrase


def _size(n: int | None) -> str:
    return fmt_bytes(n) if n else "-"


def _ago(iso: str | None) -> str:
    if not iso:
        return "never"
    seconds = (datetime.now(timezone.utc) - datetime.fromisoformat(iso)).total_seconds()
    if seconds < 90:
        return f"{seconds:.0f} s ago"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def _until(row: dict[str, Any]) -> str:
    """When the model, unused, moves down a tier: `in 4 min`, `forever`, or `-` where nothing expires."""
    if row.get("expires_at"):
        seconds = (datetime.fromisoformat(row["expires_at"]) - datetime.now(timezone.utc)).total_seconds()
        if seconds < 1:
            return "now"
        return f"in {seconds:.0f} s" if seconds < 90 else f"in {seconds / 60:.0f} min"
    if row["tier"] in ("gpu", "ram") and row.get("keep_alive_s") is None and not row.get("moving_to"):
        return "forever"
    return "-"


def _moving(row: dict[str, Any]) -> str:
    """`-> gpu 17s copying to the device 45%`: where to, for how long, and the stage it is in."""
    move = row.get("move")
    if not row.get("moving_to"):
        return "-"
    if not move:
        return f"-> {row['moving_to']}"
    text = f"-> {move['dst']} {move['elapsed_s']:.0f}s"
    if move.get("stage"):
        text += f" {move['stage']}"
    if move.get("percent") is not None:
        text += f" {move['percent']:.0f}%"
    return text


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def format_ps(data: dict[str, Any]) -> str:
    header = ["MODEL", "TIER", "PROCESSOR", "SIZE", "ENGINE", "CONTEXT", "MOVING", "IN-FLIGHT", "WAITING", "DEVICE",
              "HOST", "LAST-USED", "UNTIL", "MOVES", "LAST-ERROR"]
    rows = [header]
    for m in data["data"]:
        error = (m.get("last_error") or "-").splitlines()[0][:60]
        rows.append([m["name"], m["tier"], m.get("processor") or "-", _size(m.get("size_bytes")),
                     m.get("engine") or "-", str(m.get("context_length") or "-"), _moving(m), str(m["in_flight"]),
                     str(m["waiting"]), _size(m["device_bytes"]), _size(m["host_bytes"]), _ago(m.get("last_used")),
                     _until(m), str(m.get("moves", 0)), error])
    mem = data.get("memory") or {}
    device = f"device ({data['device']})" if data.get("device") else "device"
    footer = (f"{device} {_size(mem.get('device_used'))} of {_size(mem.get('device_budget'))}, "
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
    speed = f", {fmt_gbps(move['gbps'])}" if move["bytes"] and move["seconds"] else ""
    copy = f", host copy {move['host_copy']}" if move.get("host_copy") else ""
    return (f"  {move['model']}: {move['src']} -> {move['dst']} in {fmt_seconds(move['seconds'])} "
            f"({fmt_bytes(move['bytes'])}{speed}{copy})")


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
