"""The example agent: extract key points, translate (English → Spanish, by word table),
summarize and generate text, over the MAOF agent protocol.

    python -m examples.agents.server --port 9001      # serves http://localhost:9001/agent
"""

from __future__ import annotations

import argparse
import os
import re
import time
from typing import Any

from examples.agents.protocol import TaskError, find_text, run_until_interrupted, serve

WORDS_ES = {
    "the": "el",
    "a": "un",
    "an": "un",
    "and": "y",
    "or": "o",
    "is": "es",
    "are": "son",
    "of": "de",
    "to": "a",
    "in": "en",
    "on": "en",
    "for": "para",
    "with": "con",
    "by": "por",
    "each": "cada",
    "every": "cada",
    "stage": "etapa",
    "stages": "etapas",
    "agent": "agente",
    "agents": "agentes",
    "pipeline": "canal",
    "pipelines": "canales",
    "right": "correcta",
    "capability": "capacidad",
    "routes": "dirige",
    "text": "texto",
    "input": "entrada",
    "output": "salida",
    "key": "clave",
    "points": "puntos",
    "your": "tu",
    "goes": "va",
    "here": "aquí",
    "this": "esto",
    "that": "eso",
    "it": "lo",
    "we": "nosotros",
    "you": "tú",
    "hello": "hola",
    "world": "mundo",
    "summary": "resumen",
    "workflow": "flujo",
    "run": "ejecución",
    "result": "resultado",
    "data": "datos",
    "step": "paso",
    "steps": "pasos",
}
STOPWORDS = {
    "the",
    "a",
    "an",
    "and",
    "or",
    "of",
    "to",
    "in",
    "on",
    "for",
    "with",
    "is",
    "are",
    "it",
}


def sentences(text: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if s.strip()]


def extract_key_points(text: str) -> dict[str, Any]:
    parts = sentences(text) or ([text] if text else [])
    points = [p.rstrip(".!?") for p in parts[:5]]
    keywords = sorted(
        {
            w.lower()
            for w in re.findall(r"[A-Za-z][A-Za-z-]{3,}", text)
            if w.lower() not in STOPWORDS
        }
    )[:10]
    return {"points": points, "keywords": keywords, "text": ". ".join(points)}


def translate(text: str, language: str) -> dict[str, Any]:
    if language != "es":
        raise TaskError("UNSUPPORTED_LANGUAGE", f"only English to Spanish ('es'), not {language!r}")

    def word(match: re.Match[str]) -> str:
        original = match.group(0)
        found = WORDS_ES.get(original.lower())
        if found is None:
            return original
        return found.capitalize() if original[0].isupper() else found

    return {"text": re.sub(r"[A-Za-z]+", word, text), "language": language}


def summarize(text: str, max_words: int = 25) -> dict[str, Any]:
    words = text.split()
    summary = " ".join(words[:max_words]) + (" …" if len(words) > max_words else "")
    return {"text": summary, "summary": summary, "wordCount": len(words)}


def agent(capability: str, stage_input: Any, context: dict[str, Any]) -> Any:
    delay_ms = int(os.environ.get("EXAMPLE_AGENT_DELAY_MS", "0"))
    if delay_ms:
        time.sleep(delay_ms / 1000)
    text = find_text(stage_input)
    if capability in ("extraction", "key-points", "text-generation"):
        return extract_key_points(text)
    if capability == "translation":
        language = (
            stage_input.get("targetLanguage", "es") if isinstance(stage_input, dict) else "es"
        )
        return translate(text, str(language))
    if capability == "summarization":
        return summarize(text)
    raise TaskError("UNSUPPORTED_CAPABILITY", f"this agent does not do {capability!r}")


CAPABILITIES = ["text-generation", "extraction", "translation", "summarization"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9001)
    parser.add_argument("--path", default="/agent")
    parser.add_argument(
        "--token", default=os.environ.get("EXAMPLE_AGENT_TOKEN", "agent-secret-key")
    )
    args = parser.parse_args()
    server = serve(agent, args.host, args.port, args.path, args.token)
    run_until_interrupted(
        server,
        f"example agent: http://{args.host}:{args.port}{args.path} ({', '.join(CAPABILITIES)})",
    )


if __name__ == "__main__":
    main()
