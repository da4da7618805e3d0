"""A scripted stand-in for the Anthropic Messages API: the only fake in the project.

It has the shape main.py uses (`client.messages.create(**request)` returning an
`anthropic.types.Message`), checks each request the way the API would reject it, and
replays a fixed list of replies. `main.py --offline` and the tests drive the real agent
loop, sandbox and grader with it.
"""
import asyncio
import itertools
import json
from pathlib import Path

import anthropic
import httpx2 as httpx  # the HTTP library of anthropic>=2
from anthropic.types import Message

from conversions import MISTAKES

_ids = itertools.count()
_REQUEST = httpx.Request("POST", "http://scripted-api.invalid/v1/messages")


def reply(*blocks: dict, stop_reason: str = "tool_use") -> dict:
    return {"content": list(blocks), "stop_reason": stop_reason}


def text(s: str) -> dict:
    return {"type": "text", "text": s}


def thinking(s: str) -> dict:
    """A thinking block, signed as the API signs it: it must come back unchanged."""
    return {"type": "thinking", "thinking": s, "signature": f"sig_{next(_ids):06d}"}


def tool_use(name: str, tool_input: dict) -> dict:
    return {"type": "tool_use", "id": f"toolu_{next(_ids):06d}", "name": name, "input": tool_input}


def api_error(status: int = 529, message: str = "Overloaded") -> anthropic.APIStatusError:
    """The exception the SDK raises once its retries are spent."""
    response = httpx.Response(status, request=_REQUEST, json={"type": "error", "error": {"message": message}})
    cls = {400: anthropic.BadRequestError, 429: anthropic.RateLimitError}.get(
        status, anthropic.InternalServerError if status >= 500 else anthropic.APIStatusError)
    return cls(message, response=response, body=None)


def check_request(request: dict, signed: dict[str, str]) -> None:
    """Raise as the API would (400) for requests it refuses; `signed` maps each thinking block's
    signature, as sent, to its text."""
    problems = []
    messages = request["messages"]
    if "thinking" in request:
        budget = request["thinking"].get("budget_tokens", 0)
        if request["thinking"].get("type") != "enabled" or not 1024 <= budget < request["max_tokens"]:
            problems.append("thinking: budget_tokens must be >= 1024 and less than max_tokens")
    for message in messages:
        for block in message["content"] if isinstance(message["content"], list) else []:
            if block.get("type") == "thinking" and signed.get(block.get("signature")) != block.get("thinking"):
                problems.append("a thinking block was changed or its signature is invalid")
    if not messages or messages[0]["role"] != "user":
        problems.append("the first message must come from the user")
    breakpoints = json.dumps(request).count('"cache_control"')
    if breakpoints > 4:
        problems.append(f"{breakpoints} cache_control blocks; at most 4 are allowed")
    for i, message in enumerate(messages):
        content = message["content"]
        if not content:
            problems.append(f"messages.{i}: empty content")
        if i and message["role"] == messages[i - 1]["role"]:
            problems.append(f"messages.{i}: roles must alternate")
        if message["role"] != "assistant" or isinstance(content, str):
            continue
        asked = [b["id"] for b in content if b["type"] == "tool_use"]
        following = messages[i + 1]["content"] if i + 1 < len(messages) else []
        answered = [b.get("tool_use_id") for b in following if isinstance(b, dict)][: len(asked)]
        if asked and answered != asked:
            problems.append(f"messages.{i + 1}: every tool_use needs a tool_result, first and in order")
    if problems:
        response = httpx.Response(400, request=_REQUEST, json={"type": "error"})
        raise anthropic.BadRequestError("; ".join(problems), response=response, body=None)


class ScriptedClient:
    """Replays `replies` (dicts from `reply`, or exceptions to raise) one per request."""

    def __init__(self, replies: list, latency: float = 0.0, usage: dict | None = None):
        self.messages = self  # so that client.messages.create works
        self.replies = iter(replies)
        self.latency = latency
        self.usage = usage  # the usage every reply reports; by default, estimated from the text sizes
        self.requests: list[dict] = []
        self.signed: dict[str, str] = {}  # the thinking blocks sent, by signature

    async def create(self, **request) -> Message:
        check_request(request, self.signed)
        self.requests.append(request)  # main.py builds each request anew and never mutates a sent message
        if self.latency:
            await asyncio.sleep(self.latency)
        scripted = next(self.replies, reply(text("(the script has ended)"), stop_reason="end_turn"))
        if isinstance(scripted, Exception):
            raise scripted
        self.signed |= {b["signature"]: b["thinking"] for b in scripted["content"] if b["type"] == "thinking"}
        return Message.model_validate({
            "id": f"msg_{next(_ids):06d}", "type": "message", "role": "assistant", "model": request["model"],
            "stop_sequence": None, **scripted,
            "usage": self.usage or {"input_tokens": len(json.dumps(request["messages"])) // 4,
                                    "output_tokens": len(json.dumps(scripted["content"])) // 4}})


def conversion_script(mistake: str | None) -> list:
    """A run that converts with the reference code (or one known mistake), then submits."""
    code = Path(__file__).with_name("conversions.py").read_text()
    code += f"\nconvert_workspace('converted.npz', mistake={mistake!r})\nprint('wrote converted.npz')\n"
    return [reply(text("Converting."), tool_use("python", {"code": code})),
            reply(tool_use("submit", {"path": "converted.npz"}))]


def offline_scripts(level: int) -> list[tuple[str, list]]:
    """The reference conversion, then every wrong conversion that applies at this level."""
    return [("reference", conversion_script(None))] + [
        (m, conversion_script(m)) for m, first in MISTAKES.items() if first <= level]
