"""`clearml-umem`: serve models, run the demo on tiny local models, or look after a running router
(`ps`, `place`, `logs`: exit 0 done, 1 refused or failed, 2 usage, 3 router unreachable)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

from clearml_umem import __version__
from clearml_umem.catalog import ManifestError
from clearml_umem.config import SERVE_ENVIRONMENT, ConfigError, add_serve_arguments, config_from_args
from clearml_umem.fleet.cli import FleetUsage, add_front_command
from clearml_umem.fleet.ps import add_fleet_to_ps
from clearml_umem.log_setup import setup_logging
from clearml_umem.ops_cli import OPS_ENVIRONMENT, CommandFailed, HelpFormatter, add_ops_commands
from clearml_umem.scheduler import SchedulerError
from clearml_umem.spec import SpecError


def _serve(args: argparse.Namespace) -> int:
    from clearml_umem.clearml_io.catalogs import build_catalog
    from clearml_umem.server import GRPC_PREFIX, READY_PREFIX, UnifiedMemoryServer

    config = config_from_args(args)
    setup_logging(config.log_level)
    server = UnifiedMemoryServer(config, build_catalog(config))

    def ready(url: str) -> None:
        if server.grpc_address:
            print(f"{GRPC_PREFIX}{server.grpc_address}", flush=True)
        print(f"{READY_PREFIX}{url}", flush=True)

    asyncio.run(server.serve(ready=ready))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from clearml_umem.demo import run_demo

    setup_logging(args.log_level)
    return run_demo(work_dir=args.work_dir, device=args.device, rounds=args.rounds, keep_serving=args.keep_serving,
                    engine=args.engine, llama_server=args.llama_server)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clearml-umem", description=__doc__, formatter_class=HelpFormatter,
                                     epilog="`clearml-umem COMMAND --help` lists each command's options, defaults, "
                                            "environment variables and examples.\n\n" + OPS_ENVIRONMENT)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = sub.add_parser("serve", help="serve the models of a manifest or of the ClearML model repository",
                           description="Serve many models on one GPU behind an OpenAI-compatible router "
                                       "(http://HOST:PORT/v1), moving them between GPU, RAM and disk on demand.",
                           formatter_class=HelpFormatter, epilog=SERVE_ENVIRONMENT)
    add_serve_arguments(serve)
    serve.set_defaults(func=_serve)
    demo = sub.add_parser("demo", help="build three tiny models, serve them with room for one, print TTFT per tier",
                          formatter_class=HelpFormatter,
                          description="Build tiny random-weight models locally (no download), serve them with room "
                                      "for one on the device, and print the time to first token from each tier.",
                          epilog="examples:\n  clearml-umem demo\n  clearml-umem demo --keep-serving   "
                                 "then open the printed status page, or run `clearml-umem ps`\n"
                                 "  clearml-umem demo --engine llamacpp\n")
    demo.add_argument("--work-dir", default="~/.cache/clearml-umem/demo", help="where the models are built")
    demo.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where the top tier runs")
    demo.add_argument("--rounds", type=int, default=3, help="measurements per model and tier (median is shown)")
    demo.add_argument("--keep-serving", action="store_true", help="leave the router up after the table")
    demo.add_argument("--engine", default="transformers", choices=("transformers", "llamacpp"),
                      help="three tiny transformers models, or two tiny GGUF models on llama-server")
    demo.add_argument("--llama-server", default=None, help="llama-server binary for --engine llamacpp "
                                                           "(default: UMEM_LLAMA_SERVER, PATH, the install cache)")
    demo.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"))
    demo.set_defaults(func=_demo)
    add_ops_commands(sub)
    add_front_command(sub)
    add_fleet_to_ps(sub.choices["ps"])
    from clearml_umem.clearml_io.serving_sync import add_sync_command

    add_sync_command(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)  # a bad UMEM_* value is found while the flags are built
        return int(args.func(args))
    except (ConfigError, ManifestError, SpecError, SchedulerError, FleetUsage) as exc:
        print(f"clearml-umem: error: {exc}", file=sys.stderr)
        return 2
    except CommandFailed as exc:
        print(f"clearml-umem: error: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
