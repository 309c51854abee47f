"""The serve and benchmark tasks and the pipeline example, end to end with the real SDK offline.

Each runs as a user would run it (a child process, real router on loopback, real tiny
models, requests through the `openai` client), then the offline session is read back.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from clearml_umem.clearml_io.offline import OfflineSession
from tests.clearml_env import REPO, offline_env, run_python

SERVER_READY = all(importlib.util.find_spec(m) is not None for m in ("clearml_umem.router", "clearml_umem.metrics"))
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not SERVER_READY, reason="the router (clearml_umem.router, clearml_umem.metrics) is not there"),
]


def write_manifest(path: Path, models: dict[str, Path], names: list[str]) -> Path:
    lines = ["models:"]
    for name in names:
        lines += [f"  - name: {name}", f"    weights: {models[name]}"]
    path.write_text("\n".join(lines) + "\n")
    return path


def thread_stacks(pid: int) -> str:
    """Every thread's stack of a process that hangs, so a failure says where (py-spy, from the
    test extra; the SDK's own signal handlers keep faulthandler from doing it)."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    try:
        dump = subprocess.run([spy, "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"\n(no stacks: {exc})"
    return f"\n--- py-spy dump\n{dump.stdout}{dump.stderr}"


def start_serve_task(args: list[str], env: dict[str, str], timeout: float = 240) -> tuple[subprocess.Popen[str], str,
                                                                                          list[str]]:
    proc = subprocess.Popen([sys.executable, "tasks/serve.py", *args], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines: list[str] = []
    url: list[str] = []
    ready = threading.Event()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip())
            if line.startswith("umem: serving on "):
                url.append(line.split("umem: serving on ", 1)[1].strip())
                ready.set()
        ready.set()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    if not ready.wait(timeout) or not url:
        stacks = thread_stacks(proc.pid) if proc.poll() is None else ""
        proc.kill()
        reader.join(5)
        raise AssertionError("serve task did not become ready:\n" + "\n".join(lines[-200:]) + stacks)
    return proc, url[0], lines


def test_serve_task_records_ttft_per_visited_tier_and_swaps(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    import httpx
    import openai

    env = offline_env(tmp_path, UMEM_API_KEY="test-key")
    manifest = write_manifest(tmp_path / "models.yaml", tiny_models, ["tiny-llama", "tiny-qwen2"])
    proc, url, lines = start_serve_task(["--manifest", str(manifest), "--port", "0", "--device", "cpu",
                                         "--work-dir", str(tmp_path / "work"), "--report-period", "0.2"], env)
    visited: list[str] = []
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="test-key")
        admin = httpx.Client(base_url=url, headers={"Authorization": "Bearer test-key"}, timeout=300)
        assert {m.id for m in client.models.list().data} == {"tiny-llama", "tiny-qwen2"}

        def ask(model: str) -> None:
            stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}],
                                                    max_tokens=3, stream=True)
            assert any(chunk.choices and chunk.choices[0].delta.content for chunk in stream)

        ask("tiny-llama")
        visited.append("cold")
        ask("tiny-llama")
        visited.append("gpu")
        admin.post("/admin/models/tiny-llama/place", json={"tier": "ram"}).raise_for_status()
        ask("tiny-llama")
        visited.append("ram")
        ask("tiny-qwen2")
        time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    assert proc.returncode == 0, "\n".join(lines[-60:])

    session = OfflineSession.find(task_name="serve", cache_dir=env["CLEARML_CACHE_DIR"])
    props = session.task["hyperparams"]["properties"]
    assert props["router_url"]["value"].startswith("http://127.0.0.1:") and props["router_url"]["value"].endswith("/v1")
    assert props["served_models"]["value"].split(",") == ["tiny-llama", "tiny-qwen2"]
    assert props["device"]["value"].endswith("/cpu"), "the fleet view names each router's device"
    serve = session.hyperparams["Serve"]
    assert serve["manifest"] == str(manifest) and serve["device"] == "cpu"
    # the recorded source diff is the checkout's own (uncommitted test code may spell the key): not a leak
    recorded = {**session.task, "script": {k: v for k, v in session.task.get("script", {}).items() if k != "diff"}}
    assert "api_key" not in serve and "test-key" not in str(recorded)
    scalars = session.scalars()
    assert {series.split()[0] for series in scalars["TTFT tiny-llama (requests)"]} == set(visited)
    assert {series.split()[1] for series in scalars["TTFT tiny-llama (s)"]} == {"p50", "p95"}
    assert all(v > 0 for series in scalars["TTFT tiny-llama (s)"].values() for _, v in series)
    assert scalars["TTFT tiny-qwen2 (s)"]
    assert session.values("swap-in (s)", "tiny-llama ram->gpu")
    assert session.values("swap-out (s)", "tiny-llama gpu->ram (copy kept)"), "says the host copy was kept"
    assert session.values("cache", "hits")[-1] >= 1
    assert session.values("cache", "misses")[-1] >= 3
    rows = {row[0]: row for row in session.table("TTFT summary")[1:]}
    assert set(rows) == {"tiny-llama", "tiny-qwen2"}
    assert session.single_values()["requests"] == 4
    # which model sits where, for the web UI: the tier as a number (gpu 3) and a table
    assert session.values("model tier", "tiny-llama")[-1] == 3
    assert session.values("model tier", "tiny-qwen2")[-1] == 3
    assert {row[0]: row[1] for row in session.table("models by tier")[1:]} == {"tiny-llama": "gpu",
                                                                                "tiny-qwen2": "gpu"}


def test_benchmark_task_reports_every_tier_table_and_bandwidth_ratio(tmp_path: Path,
                                                                     tiny_models: dict[str, Path]) -> None:
    env = offline_env(tmp_path)
    manifest = write_manifest(tmp_path / "models.yaml", tiny_models, ["tiny-llama"])
    proc = run_python(["tasks/benchmark.py", "--manifest", str(manifest), "--port", "0", "--device", "cpu",
                       "--work-dir", str(tmp_path / "work"), "--runs", "2", "--probe-mb", "16"], env, timeout=600)
    console = proc.stdout + proc.stderr
    assert console.count("| model | scenario | TTFT median ms") == 1, "the table is printed once"

    session = OfflineSession.find(task_name="benchmark", cache_dir=env["CLEARML_CACHE_DIR"])
    assert session.hyperparams["Benchmark"]["runs"] == "2"
    table = session.table("benchmark")
    measured = {row[1]: row for row in table[1:] if row[0] == "tiny-llama" and row[2] != "n/a"}
    assert {"hot", "from RAM", "cold start"} <= set(measured)
    ttft = session.scalars()["benchmark TTFT tiny-llama (s)"]
    for scenario in measured:
        assert len(ttft[scenario]) == 2
    assert session.values("bandwidth probe (GB/s)", "host -> host (cpu)")[0] > 0
    assert session.values("benchmark swap / probe", "tiny-llama ram->gpu")
    assert session.scalars()["TTFT tiny-llama (requests)"].keys() >= {"gpu", "ram", "cold"}
    assert any(p["title"] == "TTFT median by scenario (ms)" for p in session.plots())
    artifacts = {a["key"]: a for a in session.task["execution"]["artifacts"]}
    assert "benchmark" in artifacts, "the results travel with the task"
    data = session.source
    stored = [json.loads(p.read_text()) for p in data.rglob("*.json") if "benchmark" in p.name]
    assert stored and stored[0]["runs"] == 2 and stored[0]["table"][0][:2] == ["model", "scenario"]


def test_pipeline_example_runs_locally_offline(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    env = offline_env(tmp_path)
    manifest = tmp_path / "pipeline.yaml"
    manifest.write_text(f"models:\n  - name: bystander\n    weights: {tiny_models['tiny-qwen2']}\n")
    run_python(["examples/pipeline.py", "--source", str(tiny_models["tiny-llama"]), "--manifest", str(manifest),
                "--work-dir", str(tmp_path / "work"), "--runs", "1"], env, timeout=600)
    session = OfflineSession.find(task_name="register and benchmark", cache_dir=env["CLEARML_CACHE_DIR"])
    (model,) = session.output_models
    assert model["init"]["name"] == "tiny-llama"
    assert f"model_id: {model['id']}" in manifest.read_text(), "the step handed on the model ID"
    scalars = session.scalars()
    assert scalars["benchmark TTFT tiny-llama (s)"]["hot"]
    assert "benchmark TTFT bystander (s)" not in scalars, "the benchmark measured the model it was handed"


def test_pipeline_steps_can_run_on_agents(tmp_path: Path) -> None:
    """`--queue` enqueues the steps; what lets an agent run one is in its component: the repository
    to clone (this checkout's remote at its commit) and the packages to install."""
    import runpy

    from clearml import PipelineDecorator

    example = runpy.run_path(str(REPO / "examples" / "pipeline.py"), run_name="pipeline_example")
    checkout = tmp_path / "checkout"
    subprocess.run(["git", "init", "-q", str(checkout)], check=True)
    subprocess.run(["git", "-C", str(checkout), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q",
                    "--allow-empty", "-m", "x"], check=True)
    with pytest.raises(SystemExit, match="no git remote"):
        example["agent_options"](checkout)
    subprocess.run(["git", "-C", str(checkout), "remote", "add", "origin", "https://git.example/umem.git"], check=True)
    options = example["agent_options"](checkout)
    assert options["repo"] == "https://git.example/umem.git" and len(options["repo_commit"]) == 40
    PipelineDecorator._added_decorator.clear()
    example["define_steps"](options)
    steps = {s["name"]: s for s in PipelineDecorator._added_decorator}
    PipelineDecorator._added_decorator.clear()
    for name in ("register_model_step", "benchmark_model_step"):
        assert steps[name]["repo"] == options["repo"] and steps[name]["repo_commit"] == options["repo_commit"]
        assert "-e .[transformers]" in steps[name]["packages"]


def test_serving_from_the_registry_without_a_server_says_so_in_one_line(tmp_path: Path) -> None:
    env = {k: v for k, v in offline_env(tmp_path).items() if k != "CLEARML_OFFLINE_MODE"}
    env["HOME"] = str(tmp_path / "home")
    env["CLEARML_CONFIG_FILE"] = str(tmp_path / "none.conf")
    proc = subprocess.run([sys.executable, "tasks/serve.py", "--clearml-project", "llms", "--port", "0"], env=env,
                          cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = proc.stdout + proc.stderr
    assert "none is configured" in out and "--manifest" in out and "clearml-init" in out
    assert "Traceback" not in out


def test_task_scripts_end_promptly_with_the_sdks_default_configuration(tmp_path: Path,
                                                                       tiny_models: dict[str, Path]) -> None:
    """No clearml.conf at all, as a new user runs them: before the scripts made the SDK's reporter a
    thread, one run in three waited 300 s at close for a repository analysis stuck after the
    reporter's fork ('Repository and package analysis timed out')."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLEARML_", "TRAINS_"))}
    env.update({"HOME": str(tmp_path / "home"), "CLEARML_CONFIG_FILE": str(tmp_path / "none.conf"),
                "CLEARML_CACHE_DIR": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1"})
    manifest = tmp_path / "models.yaml"
    for attempt in range(3):
        proc = subprocess.run([sys.executable, "tasks/register_model.py", "--source", str(tiny_models["tiny-llama"]),
                               "--manifest", str(manifest), "--name", f"tiny-{attempt}"], env=env,
                              cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=120)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, out[-3000:]
        assert "analysis timed out" not in out
    assert "tiny-2" in manifest.read_text()


@pytest.mark.slow
def test_a_cloned_task_runs_from_exactly_what_it_recorded(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    """What a clearml-agent does with a task cloned in the web UI, as far as this machine allows: clone the
    recorded repository at the recorded commit, build a fresh venv from exactly the recorded requirements
    (the package itself included, torch without this machine's build tag), run the recorded entry point
    with the recorded hyperparameters."""
    origin = tmp_path / "origin.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(REPO), str(origin)], check=True)
    checkout = tmp_path / "checkout"
    subprocess.run(["git", "clone", "-q", str(origin), str(checkout)], check=True)
    env = offline_env(tmp_path)
    manifest = tmp_path / "models.yaml"
    run_python([str(checkout / "tasks" / "register_model.py"), "--source", str(tiny_models["tiny-llama"]),
                "--manifest", str(manifest)], env)
    script = OfflineSession.find(task_name="register model", cache_dir=env["CLEARML_CACHE_DIR"]).task["script"]
    assert script["repository"] and script["entry_point"] == "tasks/register_model.py"
    requirements = script["requirements"]["pip"]
    assert ".[transformers]" in requirements and "torch >=2.2" in requirements and "+cpu" not in requirements
    args = OfflineSession.find(task_name="register model", cache_dir=env["CLEARML_CACHE_DIR"]).hyperparams["Args"]

    agent = tmp_path / "agent"
    subprocess.run(["git", "clone", "-q", script["repository"], str(agent)], check=True)
    subprocess.run(["git", "-C", str(agent), "checkout", "-q", script["version_num"]], check=True)
    (agent / "requirements.recorded.txt").write_text(requirements)
    venv = tmp_path / "agent-venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    install = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "-r",
                              "requirements.recorded.txt"], cwd=agent / script["working_dir"], capture_output=True,
                             text=True, timeout=1200)
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    argv = []
    for key, value in args.items():
        if value in ("", "0", "False", "None"):
            continue
        argv += [f"--{key.replace('_', '-')}"] + ([] if value == "True" else [str(value)])
    manifest.unlink()
    proc = subprocess.run([str(venv / "bin" / "python"), script["entry_point"], *argv], cwd=agent,
                          env=offline_env(tmp_path / "second"), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "tiny-llama" in manifest.read_text()
