"""Which GPU this router serves, as the process that started it says.

A clearml-agent started with `--gpus N` runs its task with `CUDA_VISIBLE_DEVICES=N` (and, in
Docker, the container sees that card alone through `NVIDIA_VISIBLE_DEVICES`), so the task's
`cuda` is that card: one agent per GPU gives one router per GPU with nothing to configure. What
is read here only names the card, for the fleet view and the task's properties.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

NO_GPU = ("", "none", "void", "-1", "nodevfiles")


def assigned_gpus(env: Mapping[str, str] | None = None) -> list[str]:
    """The physical GPUs this process was given: `CUDA_VISIBLE_DEVICES`, else `NVIDIA_VISIBLE_DEVICES`
    (what a Docker container of the agent sees); [] when neither names any ("all" is not a name)."""
    env = os.environ if env is None else env
    for var in ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES"):
        raw = env.get(var)
        if raw is None:
            continue
        ids = [part.strip() for part in raw.split(",") if part.strip()]
        if raw.strip().lower() in NO_GPU or not ids:
            return []
        if raw.strip().lower() != "all":
            return ids
    return []


def device_label(device: str, env: Mapping[str, str] | None = None, host: str | None = None) -> str:
    """`host/cuda:0=GPU 3` style: the machine, the device the router uses, and which card that is."""
    host = host or socket.gethostname()
    if not device.startswith("cuda"):
        return f"{host}/{device}"
    gpus = assigned_gpus(env)
    index = int(device.split(":", 1)[1]) if ":" in device else 0
    card = gpus[index] if index < len(gpus) else str(index)
    return f"{host}/{device if ':' in device else 'cuda:0'}=GPU {card}"
