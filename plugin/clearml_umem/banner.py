"""What the server says when it starts: what it serves, with which budgets and why, and what it exposes.

Safe defaults said out loud: an operator who starts it on 0.0.0.0 without a key is told, in
the first lines of the log, that anyone who reaches the port can run and evict models.
"""

from __future__ import annotations

import ipaddress

from clearml_umem.config import ServeConfig
from clearml_umem.memory import Budgets
from clearml_umem.runtime import Runtime
from clearml_umem.units import fmt_bytes


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def exposure_warning(host: str, port: int, api_key: str | None, admin_key: str | None) -> str | None:
    """The warning for a listener off loopback whose inference or admin routes take no key, else None."""
    if is_loopback(host) or api_key:
        return None
    where = f"listening on {host}:{port}"
    if admin_key:
        return (f"{where} without UMEM_API_KEY: anyone who can reach this port can run inference on every model "
                "(/v1/completions, /v1/chat/completions, /v1/models); set UMEM_API_KEY")
    return (f"{where} without UMEM_API_KEY or UMEM_ADMIN_KEY: anyone who can reach this port can run inference "
            "on every model (/v1/completions, /v1/chat/completions) and move or evict models "
            "(/admin/models/NAME/place), and read the models' logs (/admin/...); set UMEM_API_KEY "
            "(and UMEM_ADMIN_KEY for the admin routes), or listen on 127.0.0.1")


def start_banner(config: ServeConfig, budgets: Budgets, runtime: Runtime, url: str,
                 grpc_address: str | None = None) -> str:
    """Several lines: the URL, each model (engine, size, tiers), both budgets and how they were
    chosen, the policy and the keys (set or not, never their value)."""
    lines = [f"clearml-umem serving on {url}"]
    names = runtime.model_names()
    lines.append(f"  models ({len(names)}):")
    for name in names:
        spec = runtime.spec(name)
        st = runtime.state(name)
        tiers = "/".join(t.value for t in sorted(st.tiers, key=lambda t: t.rank))
        line = f"    {name}: {spec.engine}, {fmt_bytes(spec.size_bytes)} on disk, tiers {tiers}"
        if spec.aliases:
            line += f", aliases {', '.join(spec.aliases)}"
        problem = runtime.start_problems.get(name)
        if problem:
            line += f"; WILL NOT LOAD: {problem}"
        lines.append(line)
    for name, why in sorted(runtime.unservable.items()):
        lines.append(f"    {name}: NOT SERVED: {why}")
    lines.append(f"  device budget: {fmt_bytes(budgets.device_bytes)} on {budgets.device_kind} ({budgets.device_how})")
    lines.append(f"  host budget: {fmt_bytes(budgets.host_bytes)} ({budgets.host_how})")
    lines.append(f"  policy: {config.policy}; host copy: {config.host_copy}; fairness window: "
                 f"{config.fairness_window}; queue: {config.max_waiting} requests per model")
    keys = "API key " + ("set" if config.api_key else "not set") + ", admin key " + (
        "set (admin routes take it only)" if config.admin_key else "not set")
    lines.append(f"  keys: {keys}")
    lines.append(f"  triton: HTTP {url}/v2, gRPC " + (grpc_address or "off (--grpc-port)"))
    lines.append(f"  status page: {url}/ui; admin: clearml-umem ps --url {url}")
    return "\n".join(lines)


def start_refusal(runtime: Runtime) -> str | None:
    """For `--strict`: every model that cannot be served, with why; None when all can."""
    problems = {**runtime.unservable, **runtime.start_problems}
    if not problems:
        return None
    listed = "; ".join(f"model {name}: {why}" for name, why in sorted(problems.items()))
    return f"--strict: {len(problems)} model(s) cannot be served: {listed}"
