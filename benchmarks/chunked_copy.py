"""Does copying a model's flat buffer in pieces (so progress moves) cost link speed?

Copies one buffer host -> device (pinned, as a swap-in does) with one `copy_` and with
`weight_store.copy_in_chunks` at several piece sizes, alternating, and prints each as GB/s and
as a ratio to the single copy measured in the same run. On a machine without CUDA it copies
host -> host, which only checks that the script runs.

    python benchmarks/chunked_copy.py --gb 4 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from clearml_umem.engines.weight_store import COPY_CHUNK, HostBuffer, copy_in_chunks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=2.0, help="buffer size in GB (default 2)")
    parser.add_argument("--rounds", type=int, default=5, help="copies per variant; the median is shown (default 5)")
    parser.add_argument("--chunks-mb", default="32,64,128,256", help="piece sizes to try, in MiB")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    nbytes = int(args.gb * 1e9)
    host = HostBuffer(nbytes, pin=cuda)
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda" if cuda else "cpu")

    def timed(copy: object) -> float:
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        copy()  # type: ignore[operator]
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    variants = {"one copy": lambda: dst.copy_(host.tensor, non_blocking=host.pinned)}
    for mb in (int(x) for x in args.chunks_mb.split(",")):
        variants[f"{mb} MiB pieces"] = (lambda mb=mb: copy_in_chunks(dst, host.tensor, on_bytes=lambda n: None,
                                                                     non_blocking=host.pinned, chunk=mb * 2**20))
    for copy in variants.values():
        timed(copy)  # warm up
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, copy in variants.items():
            seconds[name].append(timed(copy))
    base = statistics.median(seconds["one copy"])
    where = "host -> device (pinned: " + host.pinned_by + ")" if cuda else "host -> host (no CUDA)"
    print(f"{args.gb:.2f} GB {where}, median of {args.rounds} copies each; default piece {COPY_CHUNK // 2**20} MiB")
    for name, values in seconds.items():
        median = statistics.median(values)
        print(f"  {name:16s} {nbytes / median / 1e9:7.2f} GB/s  {base / median:5.3f}x the single copy's speed")
    host.close()


if __name__ == "__main__":
    main()
