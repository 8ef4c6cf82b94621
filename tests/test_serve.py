"""glmtune serve: a real server process on loopback, driven with the openai client and httpx.

The server's greedy answers equal glmtune's generate_text (and a trained model's memorised answers); streamed
chunks join to the same text; bounded concurrent requests all answer correctly, past the queue 429; bad requests
get their 4xx and the server keeps serving."""

from __future__ import annotations

import base64
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from memorised_qa import QA

KEY = "test-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m glmtune serve ...` in its own process group; killed (group) on exit, also on failure."""

    def __init__(self, tmp_path: Path, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp_path / f"serve-{self.port}.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "glmtune", "serve", *args, "--port", str(self.port)],
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def __enter__(self):
        try:
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline:
                assert self.proc.poll() is None, f"server ended: {self.log_path.read_text()[-2000:]}"
                try:
                    httpx.get(self.url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=2)
                    return self
                except httpx.TransportError:
                    time.sleep(0.2)
            raise AssertionError("server did not answer /v1/models in 180 s")
        except BaseException:
            self.__exit__()
            raise

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=60)
        self.log.close()

    def client(self, key: str = KEY):
        # no retries: a 429 must reach the test as it is
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=120)

    def post(self, path: str, key: str = KEY, headers: dict | None = None, **kwargs):
        headers = {"Authorization": f"Bearer {key}", **(headers or {})}
        return httpx.post(self.url + path, headers=headers, timeout=120, **kwargs)


def png(size=(32, 32), colour=(200, 30, 30)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


def data_uri(raw: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(raw).decode()


def image_message(url: str, question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": question}]}]


def test_server_answers_as_generate_text_streams_bounds_and_rejects(tiny_glm4v, tmp_path):
    from PIL import Image

    from glmtune.chat import load_for_inference
    from glmtune.data.sample import IMAGE_PLACEHOLDER, Turn
    from glmtune.generation import GenerationOptions, generate_text

    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 20)]
    questions = ["What colour is it?", "Describe the image.", "What shape?", "Is it big?"]
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "red.png").write_bytes(png(colour=colours[0]))
    family, model, processor = load_for_inference(tiny_glm4v)
    options = GenerationOptions(max_new_tokens=8)
    expected = [generate_text(family, model, processor, [([Turn("user", IMAGE_PLACEHOLDER + q)],
                                                          [Image.open(io.BytesIO(png(colour=c))).convert("RGB")])],
                              options)[0] for q, c in zip(questions, colours)]
    sampled = generate_text(family, model, processor, [([Turn("user", IMAGE_PLACEHOLDER + questions[0])],
                                                        [Image.open(io.BytesIO(png())).convert("RGB")])],
                            GenerationOptions(max_new_tokens=12, temperature=1.5, top_p=0.9, seed=3))[0]
    del model
    args = [str(tiny_glm4v), "--api-key", KEY, "--max-new-tokens", "8", "--max-tokens-cap", "16", "--max-queue", "1",
            "--max-image-pixels", "4096", "--max-request-bytes", "100000", "--allow-image-dir",
            str(tmp_path / "images")]
    with Server(tmp_path, *args) as server:
        client = server.client()
        assert [m.id for m in client.models.list()] == [tiny_glm4v.name]

        def ask(i: int, **kwargs) -> str:
            reply = client.chat.completions.create(model=tiny_glm4v.name, **{"temperature": 0, **kwargs},
                                                   messages=image_message(data_uri(png(colour=colours[i])),
                                                                          questions[i]))
            return reply.choices[0].message.content

        for i in range(4):
            assert ask(i) == expected[i]
        for _ in range(2):  # temperature, top_p, seed and max_tokens reach the generation options
            assert ask(0, temperature=1.5, top_p=0.9, seed=3, max_tokens=12) == sampled
        stream = client.chat.completions.create(model=tiny_glm4v.name, stream=True,
                                                messages=image_message(data_uri(png(colour=colours[1])),
                                                                       questions[1]))
        chunks = [c.choices[0].delta.content or "" for c in stream]
        assert "".join(chunks) == expected[1] and len([c for c in chunks if c]) > 1
        local = client.chat.completions.create(model=tiny_glm4v.name, messages=image_message(
            str(tmp_path / "images" / "red.png"), questions[0]))
        assert local.choices[0].message.content == expected[0]
        simple = server.post("/", json={"image": base64.b64encode(png(colour=colours[2])).decode(),
                                        "text": questions[2], "history": []}).json()
        assert simple["result"] == expected[2] and simple["history"] == [[questions[2], expected[2]]]

        # concurrency: 2 at a time (one generating, --max-queue 1 waiting) all answer correctly ...
        def run_all(indices):
            results, barrier = {}, threading.Barrier(len(indices))

            def one(n, i):
                barrier.wait()
                try:
                    results[n] = ask(i)
                except openai.RateLimitError:
                    results[n] = 429

            threads = [threading.Thread(target=one, args=(n, i)) for n, i in enumerate(indices)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=300)
            return [results[n] for n in range(len(indices))]

        for _ in range(2):
            assert run_all([0, 3]) == [expected[0], expected[3]]
        # ... and a burst past the queue gets 429 for the excess, correct answers for the rest
        burst = run_all([n % 4 for n in range(12)])
        assert 429 in burst and all(r in (429, expected[n % 4]) for n, r in enumerate(burst)), burst
        assert burst.count(429) <= 10

        big = png((100, 100))  # 10000 pixels > --max-image-pixels 4096
        bad = [  # (request, status, words in the message)
            (dict(json={"messages": image_message(data_uri(big), "q")}), 413, "--max-image-pixels"),
            (dict(content=b"x" * 200_000, headers={"Content-Type": "application/json"}), 413, "--max-request-bytes"),
            (dict(content=iter([b"x" * 60_000] * 2)), 413, "--max-request-bytes"),  # chunked: no Content-Length
            (dict(content=b"{not json"), 400, "not valid JSON"),
            (dict(json={"model": "x"}), 404, "not served"),
            (dict(json={}), 400, "messages"),
            (dict(json={"messages": [{"role": "assistant", "content": "hi"}]}), 400, "ending with user"),
            (dict(json={"messages": [{"role": "user", "content": "q"}], "max_tokens": 17}), 400, "--max-tokens-cap"),
            (dict(json={"messages": [{"role": "user", "content": "q"}], "top_p": 0}), 400, "top_p"),
            (dict(json={"messages": [{"role": "user", "content": "q"}], "n": 2}), 400, "n=1"),
            (dict(json={"messages": image_message("data:image/png;base64,%%%", "q")}), 400, "base64"),
            (dict(json={"messages": image_message(data_uri(b"not a png"), "q")}), 400, "not a readable image"),
            (dict(json={"messages": image_message("/etc/passwd", "q")}), 400, "--allow-image-dir"),
            (dict(json={"messages": image_message("http://example.com/a.png", "q")}), 400, "only data: URIs"),
            (dict(json={"messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": data_uri(png())}},
                {"type": "image_url", "image_url": {"url": data_uri(png())}}]}]}), 400, "one image"),
        ]
        for request, status, words in bad:
            r = server.post("/v1/chat/completions", **request)
            assert r.status_code == status and words in r.json()["error"]["message"], (request, r.text)
        r = server.post("/", json={"text": "", "history": []})
        assert r.status_code == 400 and "text" in r.json()["error"]["message"]
        with pytest.raises(openai.AuthenticationError):
            server.client(key="wrong").models.list()
        assert server.post("/", key="wrong", json={"text": "q"}).status_code == 401
        for _ in range(3):  # clients that go away mid-stream free their place (--max-queue 1: else 429)
            with httpx.stream("POST", server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                              json={"messages": [{"role": "user", "content": "q"}], "stream": True}) as r:
                assert r.status_code == 200 and next(r.iter_lines()).startswith("data: ")
        assert ask(3) == expected[3]  # still serving after all that
    assert "Traceback" not in server.log_path.read_text()


def test_trained_model_answers_through_the_server(memorised_glm4, tmp_path):
    """The tiny GLM-4 LoRA of test_predict that memorised four answers (greedy: the same text as its chat and
    predict answers there) gives them through the OpenAI route, streamed, and the seed's simple API."""
    ckpt, _ = memorised_glm4
    with Server(tmp_path, str(ckpt), "--api-key", KEY, "--max-new-tokens", "8", "--model-name", "tuned") as server:
        client = server.client()
        for q, a in QA:
            reply = client.chat.completions.create(model="tuned", messages=[{"role": "user", "content": q}])
            assert reply.choices[0].message.content == a and reply.choices[0].finish_reason == "stop"
            stream = client.chat.completions.create(model="tuned", stream=True,
                                                    messages=[{"role": "user", "content": q}])
            assert "".join(c.choices[0].delta.content or "" for c in stream) == a
            assert server.post("/", json={"text": q, "history": []}).json()["result"] == a
        # a stop string cuts the answer before it, streamed or not ("blue" -> "bl")
        ask = dict(model="tuned", messages=[{"role": "user", "content": QA[0][0]}], stop=["ue", "zz"])
        reply = client.chat.completions.create(**ask)
        assert reply.choices[0].message.content == "bl" and reply.choices[0].finish_reason == "stop"
        assert "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**ask, stream=True)) \
            == "bl"


def test_serve_bad_options_are_one_line_errors(tiny_glm4, capsys):
    from glmtune.cli import main

    for args, words in ((["--max-queue", "-1"], "--max-queue -1: must be >= 0"),
                        (["--max-new-tokens", "64", "--max-tokens-cap", "32"], "over --max-tokens-cap 32"),
                        (["--allow-image-dir", "/no/such/dir"], "--allow-image-dir /no/such/dir: not a folder")):
        assert main(["serve", str(tiny_glm4), *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("glmtune serve: error: ") and words in err and err.count("\n") == 1
