"""Serving configuration: one dataclass, filled from CLI flags, `UMEM_*` variables or a ClearML task.

Precedence is flag > environment > default. The keys are read from the environment only
(`UMEM_API_KEY`, `UMEM_ADMIN_KEY`), so they never land in a shell history or a task's
hyperparameters.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from clearml_umem.keep_alive import parse_keep_alive
from clearml_umem.memory import parse_size
from clearml_umem.policy import POLICIES

ENV_PREFIX = "UMEM_"
HOST_COPY_MODES = ("auto", "keep", "evict")
BATCHING_MODES = ("auto", "all", "greedy", "off")
ENGINE_CHOICES = ("auto", "transformers", "vllm")
"""The serve setting `engine`: the engine of Hugging Face models whose entry names none (a GGUF is
always llama.cpp's). `auto`: vLLM where it can serve (a CUDA device, vLLM importable or
--vllm-python given), else transformers."""
DEFAULT_WORK_DIR = "~/.cache/clearml-umem"


class ConfigError(ValueError):
    """A setting that cannot work; raised at start, before anything is loaded."""


@dataclass
class ServeConfig:
    manifest: str | None = None
    """Local manifest (YAML/JSON) of models: the embedded default catalog."""
    clearml_project: str | None = None
    clearml_name: str | None = None
    clearml_tags: list[str] = field(default_factory=list)
    clearml_ids: list[str] = field(default_factory=list)
    clearml_published: bool = False
    """Serve only published (ready) registry entries."""
    host: str = "127.0.0.1"
    port: int = 8000
    grpc_port: int | None = None
    """Triton's gRPC protocol (GRPCInferenceService) on this port of `host`; off when unset, 0 picks
    a free port. Needs the `[triton]` extra (grpcio, tritonclient)."""
    device: str = "auto"
    device_budget: str | None = None
    host_budget: str | None = None
    policy: str = "lru"
    engine: str = "auto"
    """Engine of the Hugging Face models whose entry names none: auto, transformers or vllm (ENGINE_CHOICES)."""
    host_copy: str = "auto"
    """Transformers models: keep the host copy of a hot model (swap-out frees device memory
    only), copy on eviction instead (`evict`), or decide from the budgets (`auto`)."""
    pipelined_swap_in: bool = True
    """Transformers models: a swap-in from RAM lets the first request's forward pass start while the
    weights are still being copied, each layer waiting for its own (`--no-pipelined-swap-in`: copy
    everything first). Applies where the host copy is kept while hot."""
    batching: str = "auto"
    """Transformers models: concurrent requests without per-token options share forwards through
    transformers' continuous batching (`engines.batching`): `auto` greedy ones, and sampled ones
    without a seed on a GPU; `all` both on any device; `greedy` greedy ones only; `off`: each request
    runs its own generate()."""
    fairness_window: str = "auto"
    """`auto`: a model that came to the GPU serves its turn (the requests waiting for it, and those
    arriving within 2x its swap-in from RAM) before it leaves, even when it drains for an older
    request, passing that request over for a bounded time only (turns.py); `off`: strict arrival
    order, a draining model serves nothing more."""
    max_waiting: int = 256
    """Requests each model may queue; one more gets a 429 with Retry-After."""
    max_request_bytes: str = "8MiB"
    """Largest request body accepted; bigger ones get a 413 before anything reads them."""
    max_messages: int = 10000
    """Messages one chat request may hold; more get a 400 naming `messages`. Any body may hold 10x as
    many JSON values (`json_body.VALUES_PER_MESSAGE`)."""
    header_timeout: float = 10.0
    """Seconds a request's headers may take from its first byte (nginx client_header_timeout)."""
    body_timeout: float = 30.0
    """Seconds between two reads of a request body before the connection is cut (nginx client_body_timeout)."""
    idle_timeout: float = 5.0
    """Seconds a connection may stay open without sending a request (new, or kept alive after one)."""
    max_connections: int = 0
    """Connections open at once; 0 = three quarters of the descriptor limit (ulimit -n)."""
    shutdown_grace: float = 10.0
    """On SIGTERM, seconds running requests may take to finish before they are ended with an error."""
    allowed_hosts: list[str] = field(default_factory=list)
    """Host header values accepted besides the defaults (localhost names, the listen address, the
    machine's names when listening on all interfaces); `*` accepts any (DNS rebinding then open)."""
    work_dir: str = DEFAULT_WORK_DIR
    catalog_poll_seconds: float = 0.0
    catalog_removal_grace_seconds: float = 30.0
    """A model missing from the catalog is removed only once it has been missing on two polls in
    a row and for this long: a manifest caught half-written, or a registry query that returned
    part of its list, must not drop a model and answer its queued requests 404."""
    engine_stall_seconds: float = 30.0
    """An engine that makes no progress this long with a request in flight (a server that sends
    no byte and does not answer /health either; a generation thread that makes no step) is
    hung: its requests get an error, it is stopped, shown failed and its memory given back."""
    vllm_python: str | None = None
    llama_server: str | None = None
    """The llama-server binary for GGUF models (else on PATH, or where scripts/install-llama-server.sh put it)."""
    strict: bool = False
    """Refuse to start when a catalog model can be known not to load (no engine, no llama-server,
    over a budget) instead of serving the others and listing it in the banner."""
    log_level: str = "info"
    access_log: bool = True
    """One line per request under the `clearml_umem.access` logger (model, tier served from, status,
    time to first token, tokens in and out, duration); `--no-access-log` turns it off."""
    keep_alive: str = "never"
    """How long a model stays on the GPU unused before it moves down a tier (gpu -> ram, then after
    as long again -> disk), as Ollama's keep_alive and llama-swap's ttl: `never`, or seconds or a
    duration (`300`, `5m`, `1h`). A manifest's `keep_alive` overrides it per model, a request's
    `keep_alive` field per request."""
    api_key: str | None = field(default=None, repr=False)
    admin_key: str | None = field(default=None, repr=False)
    """When set, the admin routes (/admin/...) take this key only; the API key then serves inference alone."""

    @property
    def uses_clearml_registry(self) -> bool:
        return bool(self.clearml_project or self.clearml_name or self.clearml_tags or self.clearml_ids)

    @property
    def device_budget_bytes(self) -> int | None:
        return parse_size(self.device_budget) if self.device_budget else None

    @property
    def host_budget_bytes(self) -> int | None:
        return parse_size(self.host_budget) if self.host_budget else None

    @property
    def max_request_body(self) -> int:
        return parse_size(self.max_request_bytes)

    @property
    def work_path(self) -> Path:
        return Path(self.work_dir).expanduser()

    def validate(self) -> ServeConfig:
        if not self.manifest and not self.uses_clearml_registry:
            raise ConfigError("no models: give --manifest FILE or a ClearML selector "
                              "(--clearml-project / --clearml-name / --clearml-tags / --clearml-ids)")
        if self.manifest and self.uses_clearml_registry:
            raise ConfigError("give either --manifest or a ClearML selector, not both")
        if self.manifest and not Path(self.manifest).expanduser().is_file():
            raise ConfigError(f"manifest not found: {self.manifest}")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be 0..65535, got {self.port}")
        if self.grpc_port is not None and not 0 <= self.grpc_port <= 65535:
            raise ConfigError(f"grpc_port must be 0..65535, got {self.grpc_port}")
        if self.grpc_port and self.grpc_port == self.port:
            raise ConfigError(f"grpc_port and port are both {self.port}: the HTTP and gRPC listeners need a port each")
        if self.policy not in POLICIES:
            raise ConfigError(f"unknown policy {self.policy!r}; known: {', '.join(POLICIES)}")
        if self.engine not in ENGINE_CHOICES:
            raise ConfigError(f"engine must be one of {', '.join(ENGINE_CHOICES)}, got {self.engine!r}")
        if self.batching not in BATCHING_MODES:
            raise ConfigError(f"batching must be one of {', '.join(BATCHING_MODES)}, got {self.batching!r}")
        if self.host_copy not in HOST_COPY_MODES:
            raise ConfigError(f"host_copy must be one of {', '.join(HOST_COPY_MODES)}, got {self.host_copy!r}")
        if self.device != "auto" and self.device != "cpu" and not self.device.startswith("cuda"):
            raise ConfigError(f"device must be auto, cpu or cuda[:N], got {self.device!r}")
        for name in ("device_budget", "host_budget", "max_request_bytes"):
            value = getattr(self, name)
            if value:
                try:
                    parse_size(value)
                except ValueError as exc:
                    raise ConfigError(f"{name}: {exc}") from None
        if self.fairness_window not in ("auto", "off"):
            raise ConfigError(f"fairness_window must be auto or off, got {self.fairness_window!r}")
        try:
            parse_keep_alive(self.keep_alive)
        except ValueError as exc:
            raise ConfigError(f"keep_alive: {exc}") from None
        if self.max_waiting < 1:
            raise ConfigError(f"max_waiting must be at least 1, got {self.max_waiting}")
        if self.catalog_poll_seconds < 0:
            raise ConfigError("catalog_poll_seconds must be >= 0")
        if self.max_messages < 1:
            raise ConfigError(f"max_messages must be at least 1, got {self.max_messages}")
        for name in ("header_timeout", "body_timeout", "idle_timeout"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0 seconds, got {getattr(self, name)}")
        if self.shutdown_grace < 0:
            raise ConfigError(f"shutdown_grace must be >= 0 seconds, got {self.shutdown_grace}")
        if self.max_connections < 0:
            raise ConfigError(f"max_connections must be >= 0 (0 = from the descriptor limit), got "
                              f"{self.max_connections}")
        if self.engine_stall_seconds <= 0:
            raise ConfigError(f"engine_stall_seconds must be positive, got {self.engine_stall_seconds}")
        if self.catalog_removal_grace_seconds < 0:
            raise ConfigError("catalog_removal_grace_seconds must be >= 0")
        if self.log_level.lower() not in ("debug", "info", "warning", "error"):
            raise ConfigError(f"log_level must be debug, info, warning or error, got {self.log_level!r}")
        return self

    def resolved_engine(self) -> str:
        """`engine` with `auto` decided on this machine (see ENGINE_CHOICES)."""
        if self.engine != "auto":
            return self.engine
        if self.device == "cpu":
            return "transformers"
        import importlib.util

        if not self.vllm_python and importlib.util.find_spec("vllm") is None:
            return "transformers"
        if self.device.startswith("cuda"):
            return "vllm"
        try:
            import torch
        except ImportError:
            return "transformers"
        return "vllm" if torch.cuda.is_available() else "transformers"

    def public_dict(self) -> dict[str, Any]:
        """Everything but the secret, for a ClearML task's hyperparameters and logs."""
        data = asdict(self)
        for name in SECRETS:
            data.pop(name)
        return data

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], env: Mapping[str, str] | None = None) -> ServeConfig:
        """From a ClearML task's hyperparameters (strings from the web UI are coerced)."""
        env = os.environ if env is None else env
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            if f.name in SECRETS or f.name not in values or values[f.name] in (None, ""):
                continue
            kwargs[f.name] = _coerce(f.name, values[f.name])
        return _with_secrets(cls(**kwargs), env)


FLOAT_FIELDS = {
    "catalog_poll_seconds": "re-read the catalog every N seconds, 0 = never",
    "catalog_removal_grace_seconds": "remove a model missing from the catalog only after it was missing on two "
                                     "polls in a row and for N seconds (default 30)",
    "engine_stall_seconds": "declare an engine hung after N seconds without progress on a request in flight "
                            "(and, for a server, no answer to /health) (default 30)",
    "header_timeout": "seconds a request's headers may take from its first byte (default 10)",
    "body_timeout": "seconds between two reads of a request body (default 30)",
    "idle_timeout": "seconds a connection may stay open without a request (default 5)",
    "shutdown_grace": "on SIGTERM, seconds running requests get to finish (default 10)",
}
"""Fields that are numbers of seconds, with their help."""

SECRETS = ("api_key", "admin_key")
"""Read from `UMEM_API_KEY` / `UMEM_ADMIN_KEY` only: never a flag (shell history) or a hyperparameter."""


def _with_secrets(cfg: ServeConfig, env: Mapping[str, str]) -> ServeConfig:
    cfg.api_key = env.get(ENV_PREFIX + "API_KEY") or None
    cfg.admin_key = env.get(ENV_PREFIX + "ADMIN_KEY") or None
    return cfg


INT_FIELDS = ("port", "max_waiting", "grpc_port", "max_messages", "max_connections")
FIELD_HELP = {
    "max_messages": "messages one chat request may hold (any body: 10x as many JSON values)",
    "max_connections": "connections open at once, 0 = 3/4 of ulimit -n",
    "allowed_hosts": "comma-separated Host names accepted besides localhost and the listen address; * = any",
}
"""Integer and list fields with their help (the default is added)."""
BOOLEANS = ("clearml_published", "strict", "access_log", "pipelined_swap_in")


def _coerce(name: str, value: Any) -> Any:
    if name in ("clearml_tags", "clearml_ids", "allowed_hosts"):
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        return [str(v) for v in value]
    if name in BOOLEANS:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
            raise ConfigError(f"{name} must be true or false, got {value!r}")
        return text in ("1", "true", "yes", "on")
    if name in INT_FIELDS:
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name} must be an integer, got {value!r}") from None
    if name in FLOAT_FIELDS:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name} must be a number, got {value!r}") from None
    return str(value)


def add_serve_arguments(parser: argparse.ArgumentParser, env: Mapping[str, str] | None = None) -> None:
    """One flag per field; each reads `UMEM_<FIELD>` for its default."""
    env = os.environ if env is None else env
    defaults = ServeConfig()
    for f in fields(ServeConfig):
        if f.name in SECRETS:
            continue
        flag = "--" + f.name.replace("_", "-")
        env_value = env.get(ENV_PREFIX + f.name.upper())
        default = getattr(defaults, f.name)
        if env_value not in (None, ""):
            try:
                default = _coerce(f.name, env_value)
            except ConfigError as exc:
                raise ConfigError(f"{ENV_PREFIX}{f.name.upper()}={env_value!r}: {exc}") from None
        help_text = f"(env {ENV_PREFIX}{f.name.upper()})"
        if f.name in ("clearml_tags", "clearml_ids", "allowed_hosts"):
            words = FIELD_HELP.get(f.name, "comma-separated")
            parser.add_argument(flag, default=default, type=lambda v: _coerce("clearml_tags", v),
                                help=f"{words} {help_text}")
        elif f.name in FIELD_HELP:
            kind = int if f.name in INT_FIELDS else float
            parser.add_argument(flag, default=default, type=kind,
                                help=f"{FIELD_HELP[f.name]}, default {default} {help_text}")
        elif f.name == "port":
            parser.add_argument(flag, default=default, type=int, help=f"0 picks a free port {help_text}")
        elif f.name == "clearml_published":
            parser.add_argument(flag, default=default, action="store_true",
                                help=f"serve only published registry entries {help_text}")
        elif f.name == "access_log":
            parser.add_argument(flag, default=default, action=argparse.BooleanOptionalAction,
                                help=f"one log line per request {help_text}")
        elif f.name == "pipelined_swap_in":
            parser.add_argument(flag, default=default, action=argparse.BooleanOptionalAction,
                                help="transformers models: start a swapped-in model's first forward pass while "
                                     "its weights are still copied, layer by layer (only where the host copy is "
                                     f"kept while hot); --no-pipelined-swap-in copies them all first {help_text}")
        elif f.name == "keep_alive":
            parser.add_argument(flag, default=default,
                                help="unused this long on the GPU, a model moves down a tier (gpu -> ram, then "
                                     f"-> disk): never, seconds, or 30s/5m/1h {help_text}")
        elif f.name == "grpc_port":
            parser.add_argument(flag, default=default, type=int,
                                help="serve Triton's gRPC protocol (tritonclient.grpc) on this port of --host; "
                                     f"0 picks a free port; off when unset; needs the [triton] extra {help_text}")
        elif f.name == "strict":
            parser.add_argument(flag, default=default, action="store_true",
                                help=f"refuse to start when a model cannot be served, instead of listing it "
                                     f"in the banner and serving the others {help_text}")
        elif f.name == "engine":
            parser.add_argument(flag, default=default, choices=ENGINE_CHOICES,
                                help=f"engine of Hugging Face models whose entry names none; auto: vllm on a CUDA "
                                     f"device where vLLM is installed, else transformers; GGUF models always use "
                                     f"llamacpp (default {default}) {help_text}")
        elif f.name == "max_waiting":
            parser.add_argument(flag, default=default, type=int, help=f"requests queued per model {help_text}")
        elif f.name in FLOAT_FIELDS:
            parser.add_argument(flag, default=default, type=float, help=f"{FLOAT_FIELDS[f.name]} {help_text}")
        else:
            choices = FIELD_CHOICES.get(f.name)
            words = TEXT_HELP.get(f.name, "")
            if choices:
                words += f" ({', '.join(choices)})"
            parser.add_argument(flag, default=default, help=f"{words} {help_text}".strip())


TEXT_HELP = {
    "manifest": "YAML/JSON file listing the models (name, weights, engine, keep_alive...)",
    "clearml_project": "serve the ClearML model repository's models of this project",
    "clearml_name": "... whose name matches",
    "host": "address to listen on; anything but loopback needs UMEM_API_KEY",
    "device": "where the top tier runs: auto (CUDA when present), cpu, cuda or cuda:N",
    "device_budget": "device memory the models may use, e.g. 20GB; unset: detected",
    "host_budget": "host RAM the RAM tier may use, e.g. 64GB; unset: detected",
    "policy": "which idle model makes room first",
    "host_copy": "transformers models: keep a hot model's host copy (keep), copy on eviction (evict), or decide",
    "batching": "transformers models: which concurrent requests share forward passes: greedy ones, and sampled ones "
                "on a GPU (auto); greedy and sampled anywhere (all); greedy only; none (off)",
    "fairness_window": "auto: a model that came to the GPU serves its turn before it leaves; off: strict order",
    "max_request_bytes": "largest request body; bigger ones get a 413",
    "work_dir": "engine logs, sockets and downloaded weights",
    "vllm_python": "the Python that runs vLLM engines (default: this one)",
    "llama_server": "the llama-server binary for GGUF models (default: PATH, then the install cache)",
    "log_level": "log level",
}
FIELD_CHOICES = {
    "policy": tuple(POLICIES),
    "host_copy": HOST_COPY_MODES,
    "batching": BATCHING_MODES,
    "fairness_window": ("auto", "off"),
    "log_level": ("debug", "info", "warning", "error"),
}

SERVE_ENVIRONMENT = """environment variables (a flag given on the command line wins):
  UMEM_<FLAG>        every flag above, e.g. UMEM_DEVICE_BUDGET=20GB, UMEM_KEEP_ALIVE=5m, UMEM_ACCESS_LOG=0
  UMEM_API_KEY       the key clients send as 'Authorization: Bearer KEY' (read from the environment only)
  UMEM_ADMIN_KEY     when set, the admin routes (/admin, ps, place, logs) take only this key
  UMEM_LLAMA_SERVER  the llama-server binary, as --llama-server
  UMEM_VLLM_ALLOW_TCP=1  let a vLLM without --uds listen on 127.0.0.1 with a per-launch key

examples:
  clearml-umem serve --manifest models.yaml
  clearml-umem serve --manifest models.yaml --device-budget 20GB --keep-alive 10m
  UMEM_API_KEY=secret clearml-umem serve --manifest models.yaml --host 0.0.0.0
  clearml-umem serve --clearml-project llms --clearml-tags chat --clearml-published
"""


def config_from_args(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> ServeConfig:
    env = os.environ if env is None else env
    values = {f.name: getattr(args, f.name) for f in fields(ServeConfig) if hasattr(args, f.name)}
    return _with_secrets(ServeConfig(**values), env).validate()


def parse_serve_args(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> ServeConfig:
    parser = argparse.ArgumentParser(prog="clearml-umem serve")
    add_serve_arguments(parser, env)
    return config_from_args(parser.parse_args(argv), env)
