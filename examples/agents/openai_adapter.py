"""An adapter agent: forwards each stage to any OpenAI-compatible chat-completions endpoint,
so a real LLM can serve a capability.

    OPENAI_BASE_URL=https://api.openai.com/v1 OPENAI_API_KEY=sk-... OPENAI_MODEL=gpt-4o-mini \
    python -m examples.agents.openai_adapter --port 9002 --token adapter-token

The stage's capability and input become the prompt; the model's reply is the output
`{"text": ..., "model": ...}`. Upstream timeouts, 429s and 5xx are answered as retryable.
"""

from __future__ import annotations

import argparse
import json
import os
import urllib.error
import urllib.request
from typing import Any

from examples.agents.protocol import TaskError, run_until_interrupted, serve

SYSTEM_PROMPT = (
    "You are one agent in an automated pipeline. Perform the capability named by the user "
    "on the JSON input you are given and answer with the result only."
)


class ChatCompletions:
    def __init__(self, base_url: str, api_key: str, model: str, timeout: float = 60.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.model = model
        self.timeout = timeout

    def __call__(self, capability: str, stage_input: Any, context: dict[str, Any]) -> Any:
        prompt = f"Capability: {capability}\nInput (JSON):\n{json.dumps(stage_input, ensure_ascii=False)}"
        body = {
            "model": self.model,
            "messages": [
                {"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": prompt},
            ],
        }
        request = urllib.request.Request(  # noqa: S310 (a configured https/http URL)
            f"{self.base_url}/chat/completions",
            data=json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {self.api_key}", "Content-Type": "application/json"},
            method="POST",
        )
        deadline = min(self.timeout, max(1.0, int(context.get("deadlineMs") or 60_000) / 1000 - 1))
        try:
            with urllib.request.urlopen(request, timeout=deadline) as response:  # noqa: S310
                answer = json.load(response)
        except urllib.error.HTTPError as exc:
            retryable = exc.code == 429 or exc.code >= 500
            raise TaskError(
                f"UPSTREAM_{exc.code}", f"chat completions answered {exc.code}", retryable
            ) from None
        except (urllib.error.URLError, TimeoutError) as exc:
            raise TaskError(
                "UPSTREAM_UNREACHABLE", f"chat completions unreachable: {exc}", True
            ) from None
        try:
            text = answer["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise TaskError(
                "UPSTREAM_INVALID", "chat completions answer has no message", True
            ) from None
        return {"text": text, "model": answer.get("model", self.model)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9002)
    parser.add_argument("--path", default="/agent")
    parser.add_argument("--token", default=os.environ.get("ADAPTER_TOKEN", "adapter-token"))
    args = parser.parse_args()
    chat = ChatCompletions(
        os.environ.get("OPENAI_BASE_URL", "https://api.openai.com/v1"),
        os.environ.get("OPENAI_API_KEY", ""),
        os.environ.get("OPENAI_MODEL", "gpt-4o-mini"),
    )
    server = serve(chat, args.host, args.port, args.path, args.token)
    run_until_interrupted(
        server,
        f"openai adapter: http://{args.host}:{args.port}{args.path} -> {chat.base_url} ({chat.model})",
    )


if __name__ == "__main__":
    main()
