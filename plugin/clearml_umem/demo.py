"""The main job on the embedded default: three tiny models, room for one, TTFT from every tier.

Everything is real: tiny random-weight Llama / Qwen2 / Mistral models built locally, the
router on loopback, streaming HTTP requests. The device budget is set so that only one
model fits, so moving between models forces swaps; a round visits every tier.
"""

from __future__ import annotations

import statistics
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from clearml_umem.bandwidth import probe_bandwidth
from clearml_umem.catalog import write_manifest
from clearml_umem.client import open_client, place, stream_ttft, tier_of
from clearml_umem.config import ServeConfig
from clearml_umem.engines import EngineContext, create_engine
from clearml_umem.events import Event, MoveFinished
from clearml_umem.memory import detect_budgets, resolve_device
from clearml_umem.server import UnifiedMemoryServer
from clearml_umem.spec import ModelSpec, spec_from_mapping
from clearml_umem.tiers import Tier
from clearml_umem.tinymodels import ensure_tiny_models
from clearml_umem.units import fmt_bytes, fmt_gbps, fmt_median_of, fmt_seconds

TIER_COLUMNS = (Tier.GPU, Tier.RAM, Tier.DISK, Tier.COLD)


def _say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def _place(client: Any, model: str, tier: Tier) -> None:
    problem = place(client, model, tier)
    if problem:
        raise RuntimeError(f"{model}: {problem}")


def _fmt_ms(values: list[float]) -> str:
    return fmt_seconds(statistics.median(values)) if values else "-"


def next_steps(manifest: Path, serve_line: str, serving_url: str | None) -> str:
    """How to keep exploring after the table: the manifest the demo wrote, the line that serves it
    again, and where to look while it serves (here, with `--keep-serving`, or after that line)."""
    url = serving_url or "http://127.0.0.1:8000"
    url_flag = f" --url {serving_url}" if serving_url else ""
    lines = ["Keep exploring:",
             f"  the manifest this demo wrote: {manifest}",
             f"  serve it yourself:            {serve_line}"]
    if serving_url:
        lines.append(f"  this router stays up:         {serving_url} until Ctrl-C (OpenAI base URL {serving_url}/v1)")
    lines += [f"  status page:                  {url}/ui",
              f"  which model is where:         clearml-umem ps{url_flag}",
              f"  pre-warm or evict a model:    clearml-umem place{url_flag} MODEL gpu|ram|disk|cold",
              f"  a model's log:                clearml-umem logs{url_flag} MODEL"]
    if not serving_url:
        lines.append("  or keep this demo's router up after the table: clearml-umem demo --keep-serving")
    return "\n".join(lines)


def room_for_one(specs: list[ModelSpec], ctx: EngineContext) -> tuple[int, int, list[int]]:
    """Budgets where any one model fits on the device but no two do, and all fit in host RAM.

    Returns (device budget, host budget, each model's device bytes when hot, sorted).
    """
    engines = [create_engine(s, ctx) for s in specs]
    hot = sorted(e.footprint(Tier.GPU).device_bytes for e in engines)
    ram = sum(e.footprint(Tier.RAM).host_bytes for e in engines)
    if len(hot) > 1 and hot[0] + hot[1] <= hot[-1]:
        raise RuntimeError("models are sized so that two fit in the room of the largest; pick other sizes")
    return hot[-1], max(2 * ram, 64 * 2**20), hot


def run_demo(work_dir: str = "~/.cache/clearml-umem/demo", device: str = "auto", rounds: int = 3,
             keep_serving: bool = False, engine: str = "transformers", llama_server: str | None = None) -> int:
    """`engine` picks the models: the three tiny transformers models, or (`llamacpp`) two tiny GGUF
    models served by llama-server (f16 and q8_0)."""
    work = Path(work_dir).expanduser()
    device = resolve_device(device)
    _say(f"work dir {work}, compute device {device}")
    if engine == "llamacpp":
        from clearml_umem.engines.llama_server import find_llama_server
        from clearml_umem.tinygguf import ensure_tiny_gguf

        llama_server = find_llama_server(llama_server)
        if llama_server is None:
            print("demo: no llama-server: build it with scripts/install-llama-server.sh, or pass --llama-server",
                  file=sys.stderr)
            return 2
        _say(f"llama-server {llama_server}")
        paths = ensure_tiny_gguf(work / "gguf", progress=_say)
    else:
        paths = ensure_tiny_models(work / "models", progress=_say)
    manifest = work / f"demo-manifest-{engine}.yaml"
    specs_list = [spec_from_mapping({"name": name, "weights": str(path), "engine": engine})
                  for name, path in paths.items()]
    write_manifest(manifest, specs_list)

    device_budget, host_budget, hot = room_for_one(specs_list, EngineContext(work_dir=work, device=device))
    budgets = detect_budgets(device, device_budget, host_budget)
    needs = ", ".join(fmt_bytes(h) for h in hot)
    _say(f"device budget {fmt_bytes(device_budget)} (room for one model; they need {needs}), "
         f"host budget {fmt_bytes(budgets.host_bytes)}")

    config = ServeConfig(manifest=str(manifest), port=0, device=device, work_dir=str(work),
                         device_budget=str(device_budget), host_budget=str(budgets.host_bytes),
                         llama_server=llama_server if engine == "llamacpp" else None)
    server = UnifiedMemoryServer(config, budgets=budgets)
    swaps: dict[tuple[str, str], list[MoveFinished]] = defaultdict(list)
    lock = threading.Lock()

    def on_event(event: Event) -> None:
        if isinstance(event, MoveFinished):
            with lock:
                swaps[(event.model, event.direction)].append(event)

    server.bus.subscribe(on_event)
    ttfts: dict[str, dict[Tier, list[float]]] = {s.name: defaultdict(list) for s in specs_list}
    names = [s.name for s in specs_list]

    with server.run_in_thread() as url, open_client(url) as client:
        _say(f"router up on {url} (OpenAI API at {url}/v1, metrics at {url}/metrics)")

        def measure(model: str) -> None:
            tier = tier_of(client, model)
            ttft, text = stream_ttft(client, model)
            ttfts[model][tier].append(ttft)
            _say(f"{model:14s} from {tier.value:4s}: first token after {fmt_seconds(ttft):>8s}  -> {text!r}")

        for r in range(1, rounds + 1):
            _say(f"round {r}/{rounds}: cold starts, swaps from RAM, hot hits, reloads from disk")
            for name in names:
                _place(client, name, Tier.COLD)
            for name in names:
                measure(name)
            for name in names:
                measure(name)
            for name in names:
                measure(name)
                measure(name)
            for name in names:
                _place(client, name, Tier.DISK)
                measure(name)

        _say(f"concurrent requests for all {len(names)} models with room for one: they queue, none is dropped")
        results: dict[str, str] = {}
        errors: list[str] = []

        def one(model: str) -> None:
            try:
                results[model] = stream_ttft(client, model)[1]
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(f"{model}: {exc}")

        threads = [threading.Thread(target=one, args=(n,)) for n in names * 2]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            _say("FAILED: " + "; ".join(errors))
            return 1
        _say(f"all {len(threads)} concurrent requests answered")
        metrics_text = client.get("/metrics").text
        probe = probe_bandwidth(device, size_bytes=64 * 2**20)

        print()
        print(f"TTFT by tier ({fmt_median_of(rounds)}, streaming chat, measured by the client over HTTP)")
        header = f"{'model':14s} {'size':>8s} " + " ".join(f"{t.value + (' (hot)' if t is Tier.GPU else ''):>11s}"
                                                          for t in TIER_COLUMNS)
        header += f" {'swap-in':>11s} {'in / probe':>10s} {'swap-out':>11s} {'host copy':>9s}"
        print(header)
        print("-" * len(header))
        for s in specs_list:
            row = f"{s.name:14s} {fmt_bytes(s.size_bytes):>8s} " + " ".join(f"{_fmt_ms(ttfts[s.name][t]):>11s}"
                                                                           for t in TIER_COLUMNS)
            ins = [e.gbps for e in swaps[(s.name, "in")] if e.src is Tier.RAM]
            outs = [e for e in swaps[(s.name, "out")] if e.src is Tier.GPU and e.dst is Tier.RAM]
            gin = statistics.median(ins) if ins else 0.0
            out_ms = _fmt_ms([e.seconds for e in outs])
            copies = ",".join(sorted({e.host_copy for e in outs if e.host_copy})) or "-"
            row += f" {fmt_gbps(gin) if ins else '-':>11s} {gin / probe.gbps:10.2f} {out_ms:>11s} {copies:>9s}"
            print(row)
        print()
        print(f"bandwidth probe ({probe.path}): {fmt_gbps(probe.gbps)}; swap-in counts RAM -> {device} moves only;"
              " swap-out is GPU -> RAM, median; host copy 'kept' = it stayed while hot, only device memory freed")
        move_lines = [line for line in metrics_text.splitlines() if line.startswith("umem_move_seconds_count")]
        print(f"/metrics reports {len(move_lines)} move series; e.g. {move_lines[0] if move_lines else '-'}")
        print()
        serve_line = (f"clearml-umem serve --manifest {manifest} --device {device} --device-budget {device_budget} "
                      f"--host-budget {budgets.host_bytes}")
        if engine == "llamacpp":
            serve_line += f" --llama-server {llama_server}"
        print(next_steps(manifest, serve_line, url if keep_serving else None))
        if keep_serving:
            _say(f"serving on {url} until Ctrl-C")
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
    missing = [(n, t.value) for n in names for t in TIER_COLUMNS if not ttfts[n][t]]
    if missing:
        print(f"demo did not visit every tier: {missing}", file=sys.stderr)
        return 1
    return 0
