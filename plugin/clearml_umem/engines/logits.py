"""OpenAI's `frequency_penalty`, `presence_penalty`, `logit_bias` and `logprobs` for the
transformers engine, as logits processors.

Semantics as OpenAI documents them (and vLLM implements them): a token's logit is lowered by
`frequency_penalty` x (times it was generated so far) + `presence_penalty` x (1 if it was
generated at all); the prompt does not count. `logit_bias` adds its value to the token's logit
before sampling (-100 bans a token, 100 all but forces it). Logprobs are the model's own
distribution at each step, before penalties, bias, grammar and temperature (vLLM's default,
"raw" logprobs), with the chosen token's and the `top_logprobs` most likely ones.

Each processor is added only for a request that asks for it: a plain request runs the same
decoding loop as before, with no per-token work added.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import LogitsProcessor

from clearml_umem.engines.base import InvalidRequest


class PenaltyProcessor(LogitsProcessor):
    def __init__(self, frequency: float, presence: float, prompt_length: int) -> None:
        self._frequency = frequency
        self._presence = presence
        self._start = prompt_length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        generated = input_ids[:, self._start:]
        if generated.shape[1] == 0:
            return scores
        counts = torch.zeros_like(scores)
        ones = torch.ones_like(generated, dtype=scores.dtype)
        counts.scatter_add_(1, generated.clamp(max=scores.shape[-1] - 1), ones)
        return scores - counts * self._frequency - (counts > 0).to(scores.dtype) * self._presence


class BiasProcessor(LogitsProcessor):
    def __init__(self, bias: dict[str, float], vocab_size: int, device: torch.device) -> None:
        self._ids = torch.tensor([int(k) for k in bias], dtype=torch.long, device=device)
        self._values = torch.tensor(list(bias.values()), dtype=torch.float32, device=device)
        self._vocab = vocab_size

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.clone()
        scores[:, self._ids] += self._values.to(scores.dtype)
        return scores


def check_logit_bias(name: str, bias: dict[str, float] | None, vocab_size: int) -> None:
    """Token ids beyond the vocabulary are the client's mistake (OpenAI answers a 400 too)."""
    for token in bias or {}:
        if int(token) >= vocab_size:
            raise InvalidRequest(f"Invalid value for 'logit_bias': token id {token} is outside the vocabulary of "
                                 f"model {name!r} ({vocab_size} tokens)", param="logit_bias")


class LogprobRecorder(LogitsProcessor):
    """Keeps the model's log-distribution of the current step until the streamer says which token
    was chosen (`entries`): nothing per step is stored beyond the last one."""

    def __init__(self, tokenizer: Any, top: int) -> None:
        self._tokenizer = tokenizer
        self._top = top
        self._last: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self._last = torch.log_softmax(scores[0].detach().float(), dim=-1).cpu()
        return scores

    def entries(self, token_ids: list[int]) -> list[dict[str, Any]]:
        if self._last is None:
            return []
        out = []
        for token_id in token_ids:
            alternatives = []
            if self._top:
                values, ids = torch.topk(self._last, self._top)
                pairs = zip(values.tolist(), ids.tolist(), strict=True)
                alternatives = [self._entry(int(i), float(v)) for v, i in pairs]
            out.append({**self._entry(token_id, float(self._last[token_id])), "top_logprobs": alternatives})
        return out

    def _entry(self, token_id: int, logprob: float) -> dict[str, Any]:
        text = self._tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        return {"token": text, "logprob": max(logprob, -9999.0), "bytes": list(text.encode("utf-8"))}
