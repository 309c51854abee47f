"""Talk to a running router with the official OpenAI client.

    clearml-umem serve --manifest models.yaml &
    python examples/openai_client.py --base-url http://127.0.0.1:8000/v1
"""

from __future__ import annotations

import argparse
import os
import time

import openai


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--prompt", default="Why keep inactive models in host RAM?")
    args = parser.parse_args()
    client = openai.OpenAI(base_url=args.base_url, api_key=os.environ.get("UMEM_API_KEY", "unused"))
    for model in client.models.list().data:
        start = time.perf_counter()
        first = None
        text = []
        # the raw response carries the router's x-umem-served-from header: the tier the model came from
        raw = client.chat.completions.with_raw_response.create(
            model=model.id, messages=[{"role": "user", "content": args.prompt}], max_tokens=32, stream=True)
        for chunk in raw.parse():
            if chunk.choices and chunk.choices[0].delta.content:
                first = first or time.perf_counter() - start
                text.append(chunk.choices[0].delta.content)
        tier = raw.headers.get("x-umem-served-from", "?")
        print(f"{model.id} (from {tier}): first token after {1000 * (first or 0):.0f} ms: {''.join(text)!r}")


if __name__ == "__main__":
    main()
