"""A scripted stand-in for the Anthropic Messages API, at the HTTP layer: the only fake in the project.

`ScriptedClient` is the real `anthropic.AsyncAnthropic`, whose HTTP transport answers each
POST /v1/messages with the next scripted reply: a Message as JSON, or as server-sent events
when the SDK streams (as main.py does), or an HTTP error with the API's error body and
headers, or a failure to connect. So the SDK's own request building, streaming, response parsing and exceptions are
what `main.py --offline` and the tests run. Requests the API would refuse get its 400.
"""
import asyncio
import itertools
import json
import random
from pathlib import Path

import anthropic
import httpx2 as httpx  # the HTTP library of anthropic>=2

from conversions import convert
from diagnosis import mistakes_in_play
from instances import LEVELS, make_instance
from task import DEFAULT_LEVEL

# How often an offline band search's run at each level is scripted to pass: a steep curve, made up so that
# the search moves (the default level passes above the band, the next one in it). It says nothing about a model.
OFFLINE_PASS_RATE = {lv: 0.9 if lv <= DEFAULT_LEVEL else 0.25 if lv == DEFAULT_LEVEL + 1 else 0.05 for lv in LEVELS}

_ids = itertools.count()
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
               503: "api_error", 529: "overloaded_error"}


def reply(*blocks: dict, stop_reason: str = "tool_use", **extra) -> dict:
    """One scripted Message; extra fields (stop_details, say) go into it as the API sends them."""
    return {"content": list(blocks), "stop_reason": stop_reason, **extra}


def text(s: str) -> dict:
    return {"type": "text", "text": s}


def thinking(s: str) -> dict:
    """A thinking block, signed as the API signs it: it must come back unchanged."""
    return {"type": "thinking", "thinking": s, "signature": f"sig_{next(_ids):06d}"}


def tool_use(name: str, tool_input: dict) -> dict:
    return {"type": "tool_use", "id": f"toolu_{next(_ids):06d}", "name": name, "input": tool_input}


def http_error(status: int, message: str = "", retry_after: float | None = None, mid_stream: bool = False) -> dict:
    """A scripted HTTP error response, with the API's error body (and a retry-after header if given); with
    mid_stream, a stream that starts (HTTP 200) and then carries the error as an `error` event."""
    headers = {} if retry_after is None else {"retry-after": f"{retry_after:g}"}
    body = {"type": "error", "error": {"type": ERROR_TYPES.get(status, "api_error"), "message": message or f"HTTP {status}"}}
    return {"http_error": status, "body": body, "headers": headers, "mid_stream": mid_stream}


def connection_error(reason: str = "[Errno 111] Connection refused") -> dict:
    """A scripted failure to connect: the request never reaches the API."""
    return {"connection_error": reason}


def check_request(request: dict, signed: dict[str, str]) -> list[str]:
    """Why the API would refuse this request (400), if it would; `signed` maps each thinking block's
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
    return problems


def sse(message: dict) -> bytes:
    """The Message as the API streams it: message_start, each block's start/deltas/stop, message_delta, message_stop."""
    events = [("message_start", {"message": {**message, "content": [], "stop_reason": None,
                                             "usage": {**message["usage"], "output_tokens": 1}}})]
    for index, block in enumerate(message["content"]):
        if block["type"] == "text":
            start, deltas = {"type": "text", "text": ""}, [{"type": "text_delta", "text": block["text"]}]
        elif block["type"] == "thinking":
            start = {"type": "thinking", "thinking": "", "signature": ""}
            deltas = [{"type": "thinking_delta", "thinking": block["thinking"]},
                      {"type": "signature_delta", "signature": block["signature"]}]
        else:  # tool_use: the input arrives as JSON in pieces
            start = {"type": "tool_use", "id": block["id"], "name": block["name"], "input": {}}
            raw = json.dumps(block["input"])
            deltas = [{"type": "input_json_delta", "partial_json": raw[i:i + 64]} for i in range(0, len(raw), 64)]
        events += [("content_block_start", {"index": index, "content_block": start}),
                   *[("content_block_delta", {"index": index, "delta": d}) for d in deltas],
                   ("content_block_stop", {"index": index})]
    delta = {"stop_reason": message["stop_reason"], "stop_sequence": None}
    if "stop_details" in message:
        delta["stop_details"] = message["stop_details"]
    events += [("message_delta", {"delta": delta, "usage": {"output_tokens": message["usage"]["output_tokens"]}}),
               ("message_stop", {})]
    return b"".join(f"event: {name}\ndata: {json.dumps({'type': name, **data})}\n\n".encode() for name, data in events)


class ScriptedTransport(httpx.AsyncBaseTransport):
    """Answers POST /v1/messages with the scripted replies in turn; once they run out, with end_turn."""

    def __init__(self, replies: list, latency: float = 0.0, usage: dict | None = None):
        self.replies = iter(replies)
        self.latency = latency
        self.usage = usage  # the usage every reply reports; by default, estimated from the text sizes
        self.requests: list[dict] = []
        self.signed: dict[str, str] = {}  # the thinking blocks sent, by signature

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(await request.aread())
        if self.latency:
            await asyncio.sleep(self.latency)
        problems = check_request(body, self.signed)
        if problems:
            return httpx.Response(400, json=http_error(400, "; ".join(problems))["body"])
        scripted = next(self.replies, reply(text("(the script has ended)"), stop_reason="end_turn"))
        if "connection_error" in scripted:
            raise httpx.ConnectError(scripted["connection_error"], request=request)
        self.requests.append(body)  # main.py builds each request anew and never mutates a sent message
        if "http_error" in scripted and scripted["mid_stream"] and body.get("stream"):
            start = {"type": "message_start", "message": {"id": f"msg_{next(_ids):06d}", "type": "message", "role":
                     "assistant", "model": body["model"], "content": [], "stop_reason": None, "stop_sequence": None,
                     "usage": {"input_tokens": 1, "output_tokens": 1}}}
            events = f"event: message_start\ndata: {json.dumps(start)}\n\nevent: error\ndata: {json.dumps(scripted['body'])}\n\n"
            return httpx.Response(200, content=events.encode(), headers={"content-type": "text/event-stream"})
        if "http_error" in scripted:
            return httpx.Response(scripted["http_error"], json=scripted["body"], headers=scripted["headers"])
        self.signed |= {b["signature"]: b["thinking"] for b in scripted["content"] if b["type"] == "thinking"}
        message = {"id": f"msg_{next(_ids):06d}", "type": "message", "role": "assistant", "model": body["model"],
                   "stop_sequence": None, **scripted,
                   "usage": self.usage or {"input_tokens": len(json.dumps(body["messages"])) // 4,
                                           "output_tokens": len(json.dumps(scripted["content"])) // 4}}
        if body.get("stream"):
            return httpx.Response(200, content=sse(message), headers={"content-type": "text/event-stream"})
        return httpx.Response(200, json=message)


class ScriptedClient(anthropic.AsyncAnthropic):
    """The real SDK client, its requests served by a ScriptedTransport (no retries of its own:
    main.py's retry policy is what runs)."""

    def __init__(self, replies: list, latency: float = 0.0, usage: dict | None = None):
        self.transport = ScriptedTransport(replies, latency, usage)
        super().__init__(api_key="scripted", base_url="http://scripted-api.invalid", max_retries=0,
                         http_client=httpx.AsyncClient(transport=self.transport))

    @property
    def requests(self) -> list[dict]:
        """Every request the stand-in accepted, as JSON."""
        return self.transport.requests


def conversion_script(mistake: str | None) -> list:
    """A run that converts with the reference code (or one known mistake), then submits."""
    code = Path(__file__).with_name("conversions.py").read_text()
    code += f"\nconvert_workspace('converted.npz', mistake={mistake!r})\nprint('wrote converted.npz')\n"
    return [reply(text("Converting."), tool_use("python", {"code": code})),
            reply(tool_use("submit", {"path": "converted.npz"}))]


def offline_scripts(level: int, seed: int) -> list[tuple[str, list]]:
    """The reference conversion, then every wrong conversion in play on this instance."""
    inst = make_instance(level, seed)
    reference = convert(inst.files, inst.args, inst.config, optimizer=inst.optimizer)
    return [("reference", conversion_script(None))] + [(m, conversion_script(m)) for m, _ in mistakes_in_play(
        inst.files, inst.args, inst.config, inst.optimizer, level, reference)]


def scripted_attempt(level: int, seed: int) -> tuple[str, list]:
    """An offline search's run: the reference conversion with the chance OFFLINE_PASS_RATE[level], else one of
    the wrong conversions in play on the instance, drawn from a generator seeded by (level, seed)."""
    rng = random.Random(f"{level}:{seed}")
    reference, *wrong = offline_scripts(level, seed)
    return reference if rng.random() < OFFLINE_PASS_RATE[level] or not wrong else rng.choice(wrong)
