"""Time to first token over Triton's gRPC protocol beside the OpenAI route's, in one run.

A router process (the real CLI, `--grpc-port 0`) serves two tiny models with room for one on
the device, so every switch of model is a swap from RAM. Each round asks each model twice
(the first swaps it in, the second finds it hot) over each protocol, in rotating order so that
machine noise hits them alike:

- openai: `POST /v1/completions` with `stream: true` (httpx, one kept-alive connection);
- grpc: `ModelStreamInfer` with `stream: true` (tritonclient.grpc, one open stream);
- http generate_stream: Triton's generate extension over HTTP (SSE).

TTFT is taken by the client, from sending the request to the first piece of text, and
grouped by the tier the router reports it served from (x-umem-served-from / `served_from`).
The table shows medians and each protocol's ratio to the OpenAI route's median in the same
tier. Needs the `[triton]` extra.

    python benchmarks/triton_ttft.py                       # about a minute on 2 cores
    python benchmarks/triton_ttft.py --rounds 20 --device cuda --json
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

import httpx
import numpy as np
import tritonclient.grpc as grpcclient

from clearml_umem.catalog import write_manifest
from clearml_umem.demo import room_for_one
from clearml_umem.engines import EngineContext
from clearml_umem.server import GRPC_PREFIX, READY_PREFIX
from clearml_umem.spec import spec_from_mapping
from clearml_umem.tinymodels import DEMO_MODELS, ensure_tiny_models

PROMPT = "Once upon a time"
PROTOCOLS = ("openai", "grpc", "http generate_stream")


def start_router(manifest: Path, work: Path, device: str, budgets: tuple[int, int]) -> tuple[subprocess.Popen[str],
                                                                                               str, str]:
    cmd = [sys.executable, "-m", "clearml_umem", "serve", "--manifest", str(manifest), "--port", "0",
           "--grpc-port", "0", "--work-dir", str(work), "--device", device, "--device-budget", str(budgets[0]),
           "--host-budget", str(budgets[1]), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "UMEM_API_KEY": "", "UMEM_ADMIN_KEY": ""})
    assert proc.stdout is not None
    grpc_address = ""
    for line in proc.stdout:
        if line.startswith(GRPC_PREFIX):
            grpc_address = line[len(GRPC_PREFIX):].strip()
        if line.startswith(READY_PREFIX):
            threading.Thread(target=lambda: [None for _ in proc.stdout or ()], daemon=True).start()
            return proc, line[len(READY_PREFIX):].strip(), grpc_address
    raise RuntimeError(f"the router exited with {proc.wait()}")


def openai_ttft(http: httpx.Client, url: str, model: str, max_tokens: int) -> tuple[float, str]:
    body = {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    started = time.perf_counter()
    with http.stream("POST", url + "/v1/completions", json=body) as resp:
        resp.raise_for_status()
        lines = resp.iter_lines()
        for line in lines:
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["text"]:
                ttft = time.perf_counter() - started
                for _ in lines:  # the rest of the answer: the next request finds the model idle
                    pass
                return ttft, resp.headers["x-umem-served-from"]
    raise RuntimeError("no text")


def generate_stream_ttft(http: httpx.Client, url: str, model: str, max_tokens: int) -> tuple[float, str]:
    body = {"text_input": PROMPT, "parameters": {"max_tokens": max_tokens, "temperature": 0}}
    started = time.perf_counter()
    with http.stream("POST", f"{url}/v2/models/{model}/generate_stream", json=body) as resp:
        resp.raise_for_status()
        lines = resp.iter_lines()
        for line in lines:
            if line.startswith("data: {") and json.loads(line[6:]).get("text_output"):
                ttft = time.perf_counter() - started
                for _ in lines:
                    pass
                return ttft, resp.headers["x-umem-served-from"]
    raise RuntimeError("no text")


class GrpcStream:
    """One ModelStreamInfer stream kept open, as vLLM-backend client code keeps it."""

    def __init__(self, address: str) -> None:
        self.client = grpcclient.InferenceServerClient(address)
        self.responses: queue.Queue = queue.Queue()
        self.client.start_stream(callback=lambda result, error: self.responses.put((time.perf_counter(), result,
                                                                                     error)))

    def ttft(self, model: str, max_tokens: int) -> tuple[float, str]:
        inputs = [grpcclient.InferInput("text_input", [1], "BYTES"), grpcclient.InferInput("stream", [1], "BOOL"),
                  grpcclient.InferInput("sampling_parameters", [1], "BYTES")]
        inputs[0].set_data_from_numpy(np.array([PROMPT.encode()], dtype=object))
        inputs[1].set_data_from_numpy(np.array([True]))
        inputs[2].set_data_from_numpy(np.array([json.dumps({"max_tokens": max_tokens, "temperature": 0}).encode()],
                                               dtype=object))
        started = time.perf_counter()
        self.client.async_stream_infer(model, inputs, enable_empty_final_response=True)
        first: float | None = None
        tier = ""
        while True:
            at, result, error = self.responses.get(timeout=300)
            if error is not None:
                raise RuntimeError(str(error))
            response = result.get_response()
            if first is None and response.outputs and result.as_numpy("text_output")[0]:
                first, tier = at - started, response.parameters["served_from"].string_param
            if response.parameters["triton_final_response"].bool_param:
                break
        if first is None:
            raise RuntimeError("no text")
        return first, tier

    def close(self) -> None:
        self.client.stop_stream()
        self.client.close()


def measure(url: str, grpc_address: str, models: list[str], rounds: int,
            max_tokens: int) -> dict[tuple[str, str], list[float]]:
    samples: dict[tuple[str, str], list[float]] = defaultdict(list)
    stream = GrpcStream(grpc_address)
    try:
        with httpx.Client(timeout=300) as http:
            askers: dict[str, Callable[[str], tuple[float, str]]] = {
                "openai": lambda m: openai_ttft(http, url, m, max_tokens),
                "grpc": lambda m: stream.ttft(m, max_tokens),
                "http generate_stream": lambda m: generate_stream_ttft(http, url, m, max_tokens),
            }
            for name in models:  # every model loaded once: the rounds measure swaps and hits, not cold starts
                askers["openai"](name)
            for r in range(rounds):
                order = PROTOCOLS[r % len(PROTOCOLS):] + PROTOCOLS[:r % len(PROTOCOLS)]
                for protocol in order:
                    for name in models:
                        for _ in range(2):  # a swap-in, then a hit
                            ttft, tier = askers[protocol](name)
                            samples[(protocol, tier)].append(ttft)
    finally:
        stream.close()
    return samples


def table(samples: dict[tuple[str, str], list[float]]) -> list[str]:
    lines = [f"{'tier':<6} {'protocol':<22} {'n':>4} {'median ms':>10} {'vs openai':>10}"]
    for tier in ("gpu", "ram", "disk", "cold"):
        base = samples.get(("openai", tier))
        for protocol in PROTOCOLS:
            values = samples.get((protocol, tier))
            if not values:
                continue
            median = statistics.median(values)
            ratio = f"{median / statistics.median(base):.2f}x" if base else "-"
            lines.append(f"{tier:<6} {protocol:<22} {len(values):>4} {median * 1e3:>10.1f} {ratio:>10}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--work-dir", default=None)
    p.add_argument("--json", action="store_true", help="print the raw figures as JSON too")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        paths = ensure_tiny_models(Path(os.environ.get("UMEM_TEST_MODELS") or work / "models"), DEMO_MODELS[:2])
        specs = [spec_from_mapping({"name": n, "weights": str(path)}) for n, path in paths.items()]
        manifest = work / "models.yaml"
        write_manifest(manifest, specs)
        device_budget, host_budget, _ = room_for_one(specs, EngineContext(work_dir=work, device=args.device))
        proc, url, grpc_address = start_router(manifest, work, args.device, (device_budget, host_budget))
        try:
            samples = measure(url, grpc_address, [s.name for s in specs], args.rounds, args.max_tokens)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    print("\n".join(table(samples)))
    if args.json:
        print(json.dumps({f"{protocol}/{tier}": values for (protocol, tier), values in samples.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
