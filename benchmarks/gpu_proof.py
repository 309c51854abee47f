"""The GPU proof: time to first token per tier on a real card, in one command.

Builds models of real shapes (Llama-3-8B, Llama-3.2-1B, ...) with random weights generated
on the device and saved as safetensors on local disk, serves them through the real router
with a device budget that holds one at a time, and measures, per model: TTFT hot, after a
swap from RAM, after a reload from disk and from a cold start; swap-in and swap-out
seconds and GB/s; and a host-to-device copy probe of the model's own size from the same
run, each swap-in as a ratio to it. Writes `report.md` and `report.json` to `--out`.

    python benchmarks/gpu_proof.py --out results/           # on a GPU: the default shapes
    python benchmarks/gpu_proof.py --out /tmp/p --device cpu  # small shapes, no device (the tests run this)

`scripts/gpu-proof.sh OUT` runs this on the GPU machine with the carried wheels, then the
`gpu`-marked tests. Reloads from disk and cold starts read files written in this run, so
they come from the page cache: they show the engine's cost, not the disk's.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("umem.gpu_proof")
if str(Path(__file__).resolve().parents[1]) not in sys.path:  # the scenario modules beside this one
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SWAP_IN_TARGET = 0.8
"""The issue's bar: swap-in at 0.8 of the same-size probe or better, for models of 1 GB and up."""
SWAP_OUT_TARGET_S = 0.010
"""A swap-out with the host copy kept only frees device memory: about 10 ms at most, any size."""


@dataclass(frozen=True)
class Shape:
    """A real architecture's dimensions; the weights are random, the sizes are the real ones."""

    name: str
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    max_position_embeddings: int = 8192
    rope_theta: float = 500000.0
    tie_word_embeddings: bool = False

    @property
    def parameters(self) -> int:
        h, i, n, v = self.hidden_size, self.intermediate_size, self.num_layers, self.vocab_size
        kv = h // self.num_heads * self.num_kv_heads
        attn = h * h * 2 + h * kv * 2 + (2 * kv + h if self.model_type == "qwen2" else 0)
        layer = attn + 3 * h * i + 2 * h
        return n * layer + v * h * (1 if self.tie_word_embeddings else 2) + h

    @property
    def bf16_bytes(self) -> int:
        return self.parameters * 2


SHAPES: dict[str, Shape] = {s.name: s for s in (
    Shape("llama-3.2-1b", "llama", 2048, 8192, 16, 32, 8, 128256, tie_word_embeddings=True),
    Shape("llama-3-8b", "llama", 4096, 14336, 32, 32, 8, 128256),
    Shape("qwen2.5-14b", "qwen2", 5120, 13824, 48, 40, 8, 152064, 32768, 1000000.0),
    Shape("qwen2.5-32b", "qwen2", 5120, 27648, 64, 40, 8, 152064, 32768, 1000000.0),
    # small shapes of the same architectures, for a run without a device (the test suite)
    Shape("cpu-llama", "llama", 256, 768, 2, 4, 2, 4096),
    Shape("cpu-qwen2", "qwen2", 192, 512, 2, 4, 2, 2048, 4096, 1000000.0, tie_word_embeddings=True),
)}
DEFAULT_GPU_SHAPES = ("llama-3.2-1b", "llama-3-8b")
DEFAULT_CPU_SHAPES = ("cpu-llama", "cpu-qwen2")


@dataclass
class ProofReport:
    date: str
    card: str
    environment: dict[str, Any]
    models: list[dict[str, Any]] = field(default_factory=list)
    rows: list[list[Any]] = field(default_factory=list)
    summary: list[dict[str, Any]] = field(default_factory=list)
    phases_s: dict[str, float] = field(default_factory=dict)
    runs: int = 0
    device_budget_bytes: int = 0
    errors: list[str] = field(default_factory=list)
    pipeline: list[dict[str, Any]] = field(default_factory=list)
    """TTFT from RAM, pipelined swap-in against sequential (benchmarks/proof_pipeline.py)."""
    reload: dict[str, Any] = field(default_factory=dict)
    """Reload from disk beside the storage and link probes (`proof_reload`), on the largest model."""
    load: dict[str, Any] = field(default_factory=dict)
    """Many models under load (benchmarks/proof_load.py)."""
    hot_path: dict[str, Any] = field(default_factory=dict)


def environment(device: str) -> dict[str, Any]:
    import torch
    import transformers

    env: dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "cpu_count": os.cpu_count(), "platform": platform.platform(),
    }
    try:
        import psutil

        env["host_memory_gb"] = round(psutil.virtual_memory().total / 1e9, 1)
    except ImportError:
        pass
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(0)
        env.update(card=props.name, device_memory_gb=round(props.total_memory / 1e9, 1), cuda=torch.version.cuda)
        query = "driver_version,pcie.link.gen.current,pcie.link.gen.max,pcie.link.width.current"
        try:
            out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20).stdout.strip().splitlines()
            if out:
                driver, gen, gen_max, width = (x.strip() for x in out[0].split(","))
                env.update(driver=driver, pcie=f"Gen{gen} (max Gen{gen_max}) x{width}")
        except (OSError, subprocess.SubprocessError, ValueError):
            pass
    else:
        env["card"] = f"CPU ({platform.processor() or platform.machine()}), no GPU"
    return env


def build_random_model(out_dir: Path, shape: Shape, device: str) -> dict[str, Any]:
    """Random bf16 weights made on `device`, saved as sharded safetensors with a local tokenizer.

    Output rows of tokens that are not printable ASCII (and of ids beyond the small local
    tokenizer) are zeroed (`tinymodels.prefer_printable_output`), so greedy decoding stays on
    readable text; the network and its size are untouched.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from clearml_umem.tinymodels import build_tokenizer, prefer_printable_output

    started = time.perf_counter()
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    build_tokenizer(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    config = AutoConfig.for_model(
        shape.model_type, vocab_size=shape.vocab_size, hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size, num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads, num_key_value_heads=shape.num_kv_heads,
        max_position_embeddings=shape.max_position_embeddings, rope_theta=shape.rope_theta,
        tie_word_embeddings=shape.tie_word_embeddings, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    prefer_printable_output(model, tokenizer)
    made = time.perf_counter()
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id, do_sample=False)
    model.save_pretrained(out_dir, max_shard_size="4GB")
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    parameters = sum(p.numel() for p in model.parameters())
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    saved = time.perf_counter()
    return {"name": shape.name, "architecture": shape.model_type, "parameters": parameters,
            "weight_bytes": weight_bytes, "generate_s": round(made - started, 2), "save_s": round(saved - made, 2)}


def room_for_one(manifest: Path, device: str, host_copy: str) -> int:
    """A device budget that holds the largest model but no two at once (what the engines will count)."""
    from clearml_umem.catalog import ManifestCatalog
    from clearml_umem.engines import EngineContext, create_engine
    from clearml_umem.tiers import Tier

    specs = ManifestCatalog(str(manifest)).snapshot().specs
    ctx = EngineContext(work_dir=manifest.parent, device=device, options={"host_copy": host_copy})
    needs = sorted(create_engine(s, ctx).footprint(Tier.GPU).device_bytes for s in specs)
    budget = int(needs[-1] * 1.01)
    if len(needs) > 1 and needs[0] + needs[-1] <= budget:
        budget = needs[0] + needs[-1] - 1
    return budget


def summarize(result: Any, models: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per model, laid out like the seed's table: hot / swap / reload / cold."""
    by = {(r.model, r.scenario): r for r in result.scenarios}
    lines = []
    for m in models:
        name = m["name"]

        def ms(scenario: str, _name: str = name) -> float | None:
            r = by.get((_name, scenario))
            return round(r.median_ms, 1) if r is not None and r.median_ms is not None else None

        ram = by.get((name, "from RAM"))
        swap_in_s = statistics.median(ram.swap_in_s) if ram and ram.swap_in_s else None
        swap_in_gbps = statistics.median(ram.swap_in_gbps) if ram and ram.swap_in_gbps else None
        swap_out_s = statistics.median(ram.swap_out_s) if ram and ram.swap_out_s else None
        swap_out_gbps = statistics.median(ram.swap_out_gbps) if ram and ram.swap_out_gbps else None
        probe = result.probe_for(name)
        ratio = swap_in_gbps / probe if swap_in_gbps and probe > 0 else None
        lines.append({
            "model": name, "size_gb": round(m["weight_bytes"] / 1e9, 2),
            "hot_ms": ms("hot"), "swap_ms": ms("from RAM"), "reload_ms": ms("from disk"), "cold_ms": ms("cold start"),
            "swap_in_s": swap_in_s, "swap_in_gbps": swap_in_gbps, "probe_gbps": probe,
            "swap_in_over_probe": None if ratio is None else round(ratio, 3),
            "swap_out_ms": None if swap_out_s is None else round(swap_out_s * 1000, 2),
            "swap_out_gbps": swap_out_gbps,
            "host_copy": ",".join(sorted(set(ram.host_copy))) if ram else "",
            "swap_in_target_met": None if ratio is None or m["weight_bytes"] < 1e9 else ratio >= SWAP_IN_TARGET,
            "swap_out_target_met": None if swap_out_s is None else swap_out_s <= SWAP_OUT_TARGET_S,
        })
    return lines


def markdown(report: ProofReport) -> str:
    env = report.environment
    out = [f"# GPU proof: {report.card}, {report.date}", ""]
    facts = [f"torch {env.get('torch')}", f"transformers {env.get('transformers')}", f"Python {env.get('python')}"]
    if env.get("cuda"):
        facts.insert(0, f"CUDA {env['cuda']}, driver {env.get('driver', '?')}, PCIe {env.get('pcie', '?')}")
    out += ["; ".join(facts) + f"; device budget {report.device_budget_bytes / 1e9:.2f} GB (room for one model); "
            f"{report.runs} runs per scenario, median shown.", ""]
    out += ["TTFT is measured by an HTTP client through the router (streaming chat, greedy, 4 tokens); each "
            "request follows a placement that put the model in the tier named. Swap-in GB/s is over the model's "
            "weights; the probe copies as many bytes from the same kind of page-locked buffer in the same run.", ""]
    out += ["| model | weights | hot | swap from RAM | reload from disk | cold start | swap-in | swap-in / probe "
            "| swap-out |", "|---|---|---|---|---|---|---|---|---|"]

    def f(v: Any, unit: str = "", nd: int = 1) -> str:
        return "n/a" if v is None else f"{v:.{nd}f}{unit}"

    for s in report.summary:
        out.append(f"| {s['model']} | {s['size_gb']:.2f} GB | {f(s['hot_ms'], ' ms')} | {f(s['swap_ms'], ' ms')} | "
                   f"{f(s['reload_ms'], ' ms')} | {f(s['cold_ms'], ' ms')} | {f(s['swap_in_s'], ' s', 3)} at "
                   f"{f(s['swap_in_gbps'], ' GB/s', 1)} | {f(s['swap_in_over_probe'], '', 2)} of "
                   f"{f(s['probe_gbps'], ' GB/s', 1)} | {f(s['swap_out_ms'], ' ms', 2)}"
                   + (f" at {s['swap_out_gbps']:.1f} GB/s" if s.get("swap_out_gbps") else "")
                   + f" ({s['host_copy'] or '?'}) |")
    out.append("")
    for s in report.summary:
        verdicts = []
        if s["swap_in_target_met"] is not None:
            verdicts.append(f"swap-in {'meets' if s['swap_in_target_met'] else 'misses'} the "
                            f"{SWAP_IN_TARGET:.1f} x probe target")
        if s["swap_out_target_met"] is not None:
            verdicts.append(f"swap-out {'within' if s['swap_out_target_met'] else 'over'} "
                            f"{SWAP_OUT_TARGET_S * 1000:.0f} ms")
        if verdicts:
            out.append(f"- {s['model']}: " + "; ".join(verdicts))
    out += ["", "## Every scenario", ""]
    rows = report.rows
    if rows:
        out.append("| " + " | ".join(str(c) for c in rows[0]) + " |")
        out.append("|" + "---|" * len(rows[0]))
        out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows[1:]]
    out += ["", "## Models and phases", ""]
    for m in report.models:
        out.append(f"- {m['name']} ({m['architecture']}): {m['parameters'] / 1e9:.2f} B parameters, "
                   f"{m['weight_bytes'] / 1e9:.2f} GB bf16; random weights made in {m['generate_s']} s, "
                   f"saved in {m['save_s']} s")
    out.append("- phases: " + ", ".join(f"{k} {v:.1f} s" for k, v in report.phases_s.items()))
    out.append("- reloads from disk and cold starts read files written in this run, from the page cache")
    from benchmarks import proof_pipeline

    out += proof_pipeline.markdown(report.pipeline)
    if report.reload:
        from benchmarks.proof_reload import reload_markdown

        out += [""] + reload_markdown(report.reload)
    from benchmarks.proof_load import markdown as load_markdown

    out += load_markdown(report.load)
    out += _hot_path().markdown(report.hot_path)
    if report.errors:
        out += ["", "## Errors", ""] + [f"- {e}" for e in report.errors]
    return "\n".join(out) + "\n"


def _hot_path() -> Any:
    """The hot-path scenario's module (`benchmarks/` is on the path: scripts/gpu-proof.sh puts the root there)."""
    if str(Path(__file__).resolve().parents[1]) not in sys.path:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks import proof_hot_path

    return proof_hot_path


def write(report: ProofReport, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(asdict(report), indent=2, default=str))
    (out / "report.md").write_text(markdown(report))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for report.md and report.json")
    parser.add_argument("--device", default="auto", help="auto (cuda if present), cuda or cpu")
    parser.add_argument("--shapes", default="", help=f"comma-separated, from: {', '.join(SHAPES)}")
    parser.add_argument("--runs", type=int, default=3, help="measured requests per model and scenario")
    parser.add_argument("--work-dir", default="", help="where models are written (default: a folder under /tmp)")
    parser.add_argument("--host-copy", default="auto", choices=("auto", "keep", "evict"))
    parser.add_argument("--keep-models", action="store_true", help="leave the generated models on disk")
    parser.add_argument("--load-requests", type=int, default=None,
                        help="requests per mix of the load scenario (default 128 on a GPU, 32 on the CPU; 0: skip)")
    parser.add_argument("--load-clients", type=int, default=32, help="concurrent clients of the load scenario")
    parser.add_argument("--load-shape", default="", help="shape of its four models (default llama-3-8b, cpu-llama)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

    import torch

    from clearml_umem.clearml_io.benchmark import run_benchmark
    from clearml_umem.config import ServeConfig

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    names = [n.strip() for n in args.shapes.split(",") if n.strip()] or list(
        DEFAULT_GPU_SHAPES if device.startswith("cuda") else DEFAULT_CPU_SHAPES)
    unknown = [n for n in [*names, *([args.load_shape] if args.load_shape else [])] if n not in SHAPES]
    if unknown:
        parser.error(f"unknown shape(s) {', '.join(unknown)}; known: {', '.join(SHAPES)}")
    if args.runs < 1 or args.load_clients < 1:
        parser.error("--runs and --load-clients must be at least 1")
    out = Path(args.out)
    work = Path(args.work_dir or f"/tmp/umem-gpu-proof-{os.getpid()}")
    env = environment(device)
    report = ProofReport(date=time.strftime("%Y-%m-%d"), card=env["card"], environment=env, runs=args.runs)
    t0 = time.perf_counter()
    try:
        for name in names:
            log.info("building %s (%.2f GB bf16) on %s", name, SHAPES[name].bf16_bytes / 1e9, device)
            report.models.append(build_random_model(work / "models" / name, SHAPES[name], device))
        report.phases_s["build models"] = time.perf_counter() - t0
        manifest = work / "models.json"
        manifest.write_text(json.dumps({"models": [
            {"name": m["name"], "weights": f"models/{m['name']}", "engine": "transformers", "dtype": "bfloat16"}
            for m in report.models]}))
        report.device_budget_bytes = room_for_one(manifest, device, args.host_copy)
        config = ServeConfig(manifest=str(manifest), port=0, device=device, host_copy=args.host_copy,
                             device_budget=str(report.device_budget_bytes), work_dir=str(work / "work")).validate()
        t1 = time.perf_counter()
        result = run_benchmark(config, runs=args.runs, max_tokens=4, probe_bytes=None)
        report.phases_s["benchmark"] = time.perf_counter() - t1
        report.rows = result.rows()
        report.summary = summarize(result, report.models)
        write(report, out)  # after each phase: a run stopped at a time limit keeps what it measured
        from benchmarks import proof_pipeline

        t2 = time.perf_counter()
        try:
            report.pipeline = proof_pipeline.measure(work / "models", [m["name"] for m in report.models], device,
                                                     args.runs)
        except Exception as exc:  # the scenarios after this one still run
            log.exception("the pipelined swap-in scenario failed")
            report.errors.append(f"pipelined swap-in: {type(exc).__name__}: {exc}")
        report.phases_s["pipelined swap-in"] = time.perf_counter() - t2
        write(report, out)
        from benchmarks.proof_reload import measure_reload

        t2 = time.perf_counter()
        largest = max(report.models, key=lambda m: m["weight_bytes"])["name"]
        try:
            report.reload = measure_reload(work / "models" / largest, device, runs=args.runs)
        except Exception as exc:  # the scenarios after this one still run
            log.exception("the reload scenario failed")
            report.errors.append(f"reload from disk: {type(exc).__name__}: {exc}")
        report.phases_s["reload from disk"] = time.perf_counter() - t2
        write(report, out)
        load_requests = args.load_requests if args.load_requests is not None else 128 if device != "cpu" else 32
        if load_requests > 0:  # many models under load: benchmarks/proof_load.py
            from benchmarks.proof_load import run_load

            shape = args.load_shape or ("llama-3-8b" if device != "cpu" else "cpu-llama")
            if not (work / "models" / shape).exists():
                build_random_model(work / "models" / shape, SHAPES[shape], device)
            t2 = time.perf_counter()
            try:
                report.load = run_load(work / "models" / shape, shape, work, device, args.host_copy,
                                       requests=load_requests, clients=args.load_clients)
                report.errors += report.load["errors"]
            except Exception as exc:  # the scenarios after this one still run
                log.exception("the load scenario failed")
                report.errors.append(f"load: {type(exc).__name__}: {exc}")
            report.phases_s["load"] = time.perf_counter() - t2
            write(report, out)
        t2 = time.perf_counter()
        report.hot_path = _hot_path().run(work / "models", report.models, device)
        report.phases_s["hot path"] = time.perf_counter() - t2
    except Exception as exc:
        log.exception("the proof stopped early")
        report.errors.append(f"{type(exc).__name__}: {exc}")
    finally:
        report.phases_s["total"] = time.perf_counter() - t0
        write(report, out)
        if not args.keep_models:
            shutil.rmtree(work, ignore_errors=True)
    print(markdown(report), flush=True)
    return 1 if report.errors else 0


if __name__ == "__main__":
    sys.exit(main())
