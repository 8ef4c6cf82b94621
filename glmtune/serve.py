"""`glmtune serve MODEL`: an OpenAI-compatible HTTP server plus the seed's simple API, on FastAPI + uvicorn.

Routes: GET /v1/models; POST /v1/chat/completions (image_url parts as data: URIs or, with --allow-image-dir, local
paths; "stream": true answers by server-sent events); POST / as VisualGLM-6B's api.py:
{"image": base64, "text": ..., "history": [[q, a], ...]} -> {"result", "history", "status", "time"}.

The model is not thread-safe, so one worker thread runs every generation, one request after the other; the
requests waiting for it are bounded by --max-queue (beyond: 429). Bad requests get a 4xx with a one-line message
in OpenAI's error shape: body over --max-request-bytes or an image over --max-image-pixels 413, max_tokens over
--max-tokens-cap 400, bad JSON or fields 400, wrong API key 401, unknown model 404.
"""


import asyncio
import base64
import binascii
import hmac
import io
import json
import queue
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path

from glmtune.config import RecipeError
from glmtune.data.sample import IMAGE_PLACEHOLDER, SampleError, Turn
from glmtune.generation import GenerationOptions, encode_batch, stop_ids


@dataclass(frozen=True)
class ServeLimits:
    max_request_bytes: int = 20_000_000
    max_image_pixels: int = 16_000_000
    max_tokens_cap: int = 1024
    max_queue: int = 8  # requests waiting while one generates
    allowed_image_dirs: tuple[Path, ...] = field(default_factory=tuple)


class HTTPError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               413: "request_too_large", 429: "rate_limit_error", 500: "server_error"}


# ---- requests -> conversations ----

def decode_image(raw: bytes, where: str, max_pixels: int):
    """PIL RGB image from encoded bytes; the size is checked from the header before decoding."""
    from PIL import Image, ImageOps

    from glmtune.data.images import to_rgb

    try:
        image = Image.open(io.BytesIO(raw))
        if image.width * image.height > max_pixels:
            raise HTTPError(413, f"{where}: {image.width}x{image.height} pixels is over the server's limit of "
                                 f"{max_pixels} (--max-image-pixels)")
        image.load()
        return to_rgb(ImageOps.exif_transpose(image))
    except HTTPError:
        raise
    except Image.DecompressionBombError:
        raise HTTPError(413, f"{where}: image is over the server's pixel limit ({max_pixels})") from None
    except Exception as e:  # PIL's plugins raise OSError, ValueError, SyntaxError, EOFError, struct.error ...
        raise HTTPError(400, f"{where}: not a readable image ({type(e).__name__})") from None


def image_from_url(url, where: str, limits: ServeLimits):
    """An image_url: a base64 data: URI, or a local path (plain or file://) inside an --allow-image-dir."""
    from glmtune.data.images import image_size, load_image

    if not isinstance(url, str) or not url:
        raise HTTPError(400, f"{where}: expected a data: URI or a local path", where)
    if url.startswith("data:"):
        header, sep, payload = url.partition(",")
        if not sep or not header.endswith(";base64"):
            raise HTTPError(400, f"{where}: a data: URI must be data:image/...;base64,<data>", where)
        return decode_image(b64decode(payload, where), where, limits.max_image_pixels)
    if "://" in url and not url.startswith("file://"):
        raise HTTPError(400, f"{where}: only data: URIs and local paths are accepted, not {url.split(':')[0]} URLs",
                        where)
    path = Path(url.removeprefix("file://")).resolve()
    if not any(path.is_relative_to(d) for d in limits.allowed_image_dirs):
        raise HTTPError(400, f"{where}: local path {url} is not inside an --allow-image-dir folder", where)
    try:
        width, height = image_size(path, where)
        if width * height > limits.max_image_pixels:
            raise HTTPError(413, f"{where}: {width}x{height} pixels is over the server's limit of "
                                 f"{limits.max_image_pixels} (--max-image-pixels)", where)
        return load_image(path, where, limits.max_image_pixels)
    except SampleError as e:
        raise HTTPError(400, str(e), where) from None


def b64decode(payload, where: str) -> bytes:
    if not isinstance(payload, str):
        raise HTTPError(400, f"{where}: expected a base64 string", where)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise HTTPError(400, f"{where}: not valid base64", where) from None


def conversation_from_messages(messages, limits: ServeLimits) -> tuple[list[Turn], list]:
    """OpenAI messages -> (turns ending with a user turn, images); image parts become <image> markers in place."""
    if not isinstance(messages, list) or not messages:
        raise HTTPError(400, "messages: expected a non-empty list", "messages")
    turns, images = [], []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise HTTPError(400, f"{where}: expected an object with role system, user or assistant", where)
        content = m.get("content")
        if isinstance(content, str):
            text = content
        elif isinstance(content, list):
            pieces = []
            for j, part in enumerate(content):
                pw = f"{where}.content[{j}]"
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    pieces.append(part["text"])
                elif kind == "image_url" and m["role"] == "user":
                    url = part.get("image_url")
                    images.append(image_from_url(url.get("url") if isinstance(url, dict) else url, pw, limits))
                    pieces.append(IMAGE_PLACEHOLDER)
                else:
                    raise HTTPError(400, f"{pw}: expected a text part (or an image_url part in a user message)", pw)
            text = "".join(pieces)
        else:
            raise HTTPError(400, f"{where}.content: expected a string or a list of parts", where)
        turns.append(Turn(m["role"], text))
    roles = [t.role for t in turns]
    body = roles[1:] if roles[0] == "system" else roles
    if body != ["user", "assistant"] * (len(body) // 2) + ["user"]:
        raise HTTPError(400, f"messages: roles must be an optional system, then user/assistant alternating and "
                             f"ending with user; got {roles}", "messages")
    return turns, images


def options_from_request(req: dict, defaults: GenerationOptions, limits: ServeLimits) -> GenerationOptions:
    """OpenAI sampling fields onto GenerationOptions (absent: the server's command-line defaults)."""
    changes = {}
    max_tokens = req.get("max_completion_tokens", req.get("max_tokens"))
    if max_tokens is not None:
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise HTTPError(400, f"max_tokens {max_tokens!r}: expected a positive integer", "max_tokens")
        changes["max_new_tokens"] = max_tokens
    for key, name in (("temperature", "temperature"), ("top_p", "top_p")):
        value = req.get(key)
        if value is not None:
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise HTTPError(400, f"{key} {value!r}: expected a number", key)
            changes[name] = float(value)
    if req.get("seed") is not None:
        if not isinstance(req["seed"], int) or isinstance(req["seed"], bool) or not 0 <= req["seed"] < 2**63:
            raise HTTPError(400, f"seed {req['seed']!r}: expected an integer in [0, 2**63)", "seed")
        changes["seed"] = req["seed"]
    if req.get("n", 1) != 1:
        raise HTTPError(400, f"n {req['n']!r}: this server makes one choice per request (n=1)", "n")
    try:
        options = replace(defaults, **changes)
    except RecipeError as e:  # GenerationOptions' own range checks, named by their CLI flag: name the field
        flag, _, why = str(e).partition(" ")
        raise HTTPError(400, f"{flag.lstrip('-').replace('-', '_')} {why}") from None
    if options.max_new_tokens > limits.max_tokens_cap:
        raise HTTPError(400, f"max_tokens {options.max_new_tokens} is over the server's cap of "
                             f"{limits.max_tokens_cap} (--max-tokens-cap)", "max_tokens")
    return options


def stop_strings(stop) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > 4:
        raise HTTPError(400, "stop: expected a string or a list of up to 4 non-empty strings", "stop")
    return stops


# ---- generation: one worker thread, the only one that touches the model ----

def generate_pieces(family, model, processor, conversation, options: GenerationOptions, stops: list[str],
                    cancelled):
    """Yield ("piece", text) while generating and finally ("end", finish_reason, prompt_tokens, completion_tokens).

    The pieces join to the answer generate_text gives (the same tokens decoded the same way), cut before the
    first of the `stops` strings. A piece holds back the last character and any trailing U+FFFD (a character
    not complete yet), as stream_text does, and enough characters that a stop string is never half sent."""
    batch = encode_batch(processor, model, [conversation])
    eos, ids, sent, reason, final = stop_ids(family, model, options), [], 0, "length", None
    hold = max((len(s) for s in stops), default=1) - 1
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    steps = family.stream(model, batch, options, family.generation_eos(base), processor.pad_id)
    try:
        for token in steps:
            t = int(token[0])
            if t in eos:
                reason = "stop"
                break
            ids.append(t)
            text = processor.decode(ids).strip()
            cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
            if cut >= 0:
                final, reason = text[:cut], "stop"
                break
            safe = len(text.rstrip("\ufffd")[:-1]) - hold
            if safe > sent:
                yield ("piece", text[sent:safe])
                sent = safe
            if cancelled():
                break
    finally:
        steps.close()  # stops a transformers generate thread at its next step
    if final is None:
        final = processor.decode(ids).strip()
    if len(final) > sent:
        yield ("piece", final[sent:])
    yield ("end", reason, int(batch["attention_mask"].sum()), len(ids))


@dataclass
class Job:
    conversation: tuple
    options: GenerationOptions
    stops: list[str]
    deliver: object  # called from the worker thread with each event
    cancelled: bool = False


class Worker:
    """The single generation thread and its bounded queue (running + waiting <= max_queue + 1)."""

    def __init__(self, family, model, processor, max_queue: int):
        self.family, self.model, self.processor = family, model, processor
        self.jobs: queue.Queue = queue.Queue()
        self.capacity, self.admitted, self.lock = max_queue + 1, 0, threading.Lock()
        threading.Thread(target=self.run, daemon=True, name="glmtune-generation").start()

    def submit(self, job: Job) -> None:
        with self.lock:
            if self.admitted >= self.capacity:
                raise HTTPError(429, f"the server is busy: {self.capacity - 1} requests are already waiting "
                                     f"(--max-queue); try again later")
            self.admitted += 1
        self.jobs.put(job)

    def release(self) -> None:
        with self.lock:
            self.admitted -= 1

    def run(self) -> None:
        while True:
            job, released, error = self.jobs.get(), False, None
            try:
                if not job.cancelled:
                    for event in generate_pieces(self.family, self.model, self.processor, job.conversation,
                                                 job.options, job.stops, lambda: job.cancelled):
                        if event[0] == "end":  # free the place first: the client may send its next request at once
                            self.release()
                            released = True
                        job.deliver(event)
            except (SampleError, RecipeError) as e:  # the prompt does not fit the model (e.g. images it lacks)
                error = HTTPError(400, e.reason if isinstance(e, SampleError) else str(e))
            except Exception as e:  # a bug: reported to this client, the server goes on
                error = HTTPError(500, f"generation failed: {type(e).__name__}: {e}")
            if not released:
                self.release()
            if error is not None:
                try:
                    job.deliver(("error", error))
                except RuntimeError:  # the event loop is gone (shutting down)
                    pass


async def run_job(worker: Worker, conversation, options, stops):
    """Submit a job and yield its events in the event loop as the worker makes them."""
    loop, events = asyncio.get_running_loop(), asyncio.Queue()
    job = Job(conversation, options, stops, lambda e: loop.call_soon_threadsafe(events.put_nowait, e))
    worker.submit(job)
    try:
        while True:
            event = await events.get()
            if event[0] == "error":
                raise event[1]
            yield event
            if event[0] == "end":
                return
    finally:
        job.cancelled = True  # a client that went away stops its generation at the next token


# ---- the app ----

def make_app(family, model, processor, model_name: str, defaults: GenerationOptions, limits: ServeLimits,
             api_key: str | None = None):
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse

    app = FastAPI(title="glmtune serve", docs_url=None, redoc_url=None, openapi_url=None)
    worker = Worker(family, model, processor, limits.max_queue)

    def error_response(e: HTTPError) -> JSONResponse:
        return JSONResponse({"error": {"message": e.message, "type": ERROR_TYPES.get(e.status, "error"),
                                       "param": e.param, "code": e.status}}, status_code=e.status)

    @app.exception_handler(HTTPError)
    async def on_error(request, e: HTTPError):
        return error_response(e)

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        if api_key is not None:
            given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
            if not hmac.compare_digest(given.encode(), api_key.encode()):
                return error_response(HTTPError(401, "missing or wrong API key (Authorization: Bearer <key>)"))
        return await call_next(request)

    async def read_json(request: Request) -> dict:
        """The body as a JSON object; over --max-request-bytes 413, whatever Content-Length says."""
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limits.max_request_bytes:
            raise HTTPError(413, f"request body of {declared} bytes is over the server's limit of "
                                 f"{limits.max_request_bytes} (--max-request-bytes)")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limits.max_request_bytes:
                raise HTTPError(413, f"request body is over the server's limit of {limits.max_request_bytes} "
                                     f"bytes (--max-request-bytes)")
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise HTTPError(400, f"request body is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise HTTPError(400, "request body must be a JSON object")
        return data

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "glmtune"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = await read_json(request)
        if req.get("model") not in (None, model_name):
            raise HTTPError(404, f"model {req.get('model')!r} is not served here; this server has {model_name!r}",
                            "model")
        conversation = conversation_from_messages(req.get("messages"), limits)
        options, stops = options_from_request(req, defaults, limits), stop_strings(req.get("stop"))
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        events = run_job(worker, conversation, options, stops)
        first = await anext(events)  # a queue full (429) or a bad prompt (400) is still a plain HTTP error

        def chunk(delta: dict, finish=None) -> str:
            return "data: " + json.dumps({"id": rid, "object": "chat.completion.chunk", "created": created,
                                          "model": model_name, "choices": [{"index": 0, "delta": delta,
                                                                            "finish_reason": finish}]},
                                         ensure_ascii=False) + "\n\n"

        if req.get("stream"):
            async def sse():
                event = first
                yield chunk({"role": "assistant", "content": ""})
                try:
                    while True:
                        if event[0] == "piece":
                            yield chunk({"content": event[1]})
                        else:
                            yield chunk({}, event[1])
                            break
                        event = await anext(events)
                except HTTPError as e:
                    yield "data: " + json.dumps({"error": {"message": e.message, "code": e.status}}) + "\n\n"
                finally:
                    await events.aclose()
                yield "data: [DONE]\n\n"

            return StreamingResponse(sse(), media_type="text/event-stream")
        pieces, event = [], first
        while event[0] == "piece":
            pieces.append(event[1])
            event = await anext(events)
        _, finish, prompt_tokens, completion_tokens = event
        return {"id": rid, "object": "chat.completion", "created": created, "model": model_name,
                "choices": [{"index": 0, "finish_reason": finish,
                             "message": {"role": "assistant", "content": "".join(pieces)}}],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}

    @app.post("/")
    async def simple_api(request: Request):
        """VisualGLM-6B's api.py: {"image": base64 or null, "text", "history": [[q, a], ...]}."""
        req = await read_json(request)
        text, history = req.get("text"), req.get("history") or []
        if not isinstance(text, str) or not text:
            raise HTTPError(400, "text: expected a non-empty string (the question)", "text")
        if not isinstance(history, list) or not all(isinstance(h, list) and len(h) == 2 and
                                                    all(isinstance(x, str) for x in h) for h in history):
            raise HTTPError(400, "history: expected a list of [question, answer] string pairs", "history")
        images = []
        if req.get("image"):
            images = [decode_image(b64decode(req["image"], "image"), "image", limits.max_image_pixels)]
        turns = []
        for q, a in history:
            turns += [Turn("user", q), Turn("assistant", a)]
        # the image goes with the first question, as the seed's api.py (and glmtune chat) put it
        turns.append(Turn("user", text))
        if images:
            turns[0] = Turn("user", IMAGE_PLACEHOLDER + turns[0].text)
        options = options_from_request(req, defaults, limits)
        pieces = [e[1] async for e in run_job(worker, (turns, images), options, []) if e[0] == "piece"]
        answer = "".join(pieces)
        return {"result": answer, "history": history + [[text, answer]], "status": 200,
                "time": time.strftime("%Y-%m-%d %H:%M:%S")}

    return app


def serve(model_path, adapter=None, host: str = "127.0.0.1", port: int = 8000, model_name: str | None = None,
          options: GenerationOptions | None = None, limits: ServeLimits | None = None, api_key: str | None = None,
          quant: int | None = None, english: bool = False) -> None:
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise RecipeError("glmtune serve needs FastAPI and uvicorn: pip install 'glmtune[serve]'") from None
    from glmtune.chat import load_for_inference, set_english

    family, model, processor = load_for_inference(model_path, adapter, quant=quant)
    set_english(family, processor, english)
    app = make_app(family, model, processor, model_name or Path(model_path).name, options or GenerationOptions(),
                   limits or ServeLimits(), api_key)
    if host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        print(f"glmtune serve: warning: --host {host} without --api-key: anyone who reaches it can use the model",
              file=sys.stderr)
    print(f"glmtune serve: {model_name or Path(model_path).name} on http://{host}:{port} "
          f"(OpenAI base_url http://{host}:{port}/v1)", file=sys.stderr, flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
