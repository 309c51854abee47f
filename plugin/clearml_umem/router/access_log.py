"""One line per inference request, as a web server's access log: what an operator greps first.

Logged under `clearml_umem.access` at INFO when the request ends (a stream: when its last
byte is sent or its client leaves), in `key=value` form:

    POST /v1/chat/completions model=tiny-llama status=200 from=ram ttft=0.412s tokens_in=12 tokens_out=8 duration=0.603s

`from` is the tier the model was in when the request arrived (`gpu`: it was hot); `ttft`
the time to the first token sent; `-` where a value is not known (a request refused before
it reached a model). `--no-access-log` (UMEM_ACCESS_LOG=0) turns it off.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from clearml_umem.router.generation import Generation

log = logging.getLogger("clearml_umem.access")


@dataclass
class AccessRecord:
    method: str
    path: str
    enabled: bool = True
    model: str | None = None
    generation: Generation | None = None
    started: float = field(default_factory=time.monotonic)
    _done: bool = False

    def done(self, status: int, note: str = "") -> None:
        """Log the line once; later calls (an error after the answer was logged) are ignored."""
        if self._done or not self.enabled:
            return
        self._done = True
        gen = self.generation
        parts = [f"{self.method} {self.path}", f"model={self.model or '-'}", f"status={status}"]
        if gen is not None and gen.served_from is not None:
            usage = gen.usage()
            ttft = f"{gen.ttft_s:.3f}s" if gen.ttft_s is not None else "-"
            parts += [f"from={gen.served_from.value}", f"ttft={ttft}", f"tokens_in={usage['prompt_tokens']}",
                      f"tokens_out={usage['completion_tokens']}"]
        else:
            parts += ["from=-", "ttft=-", "tokens_in=-", "tokens_out=-"]
        parts.append(f"duration={time.monotonic() - self.started:.3f}s")
        if note:
            parts.append(f"note={note!r}")
        log.info("%s", " ".join(parts))
