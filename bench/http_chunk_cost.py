"""Frontend CPU per streamed chunk: the HTTP/SSE door against the gRPC door, same stack, same load.

Starts Redis, one frontend and one worker with the stepped engine, runs `--streams` concurrent
streams of `--tokens` tokens through each door in turn, and prints the frontend's CPU microseconds
per chunk the caller received, and what JSON encoding alone costs per chunk (json vs orjson when
installed). `python -m bench.http_chunk_cost`.
"""

from __future__ import annotations

import argparse
import asyncio
import timeit
from collections.abc import Callable, Coroutine
from typing import Any

import aiohttp
import grpc

from bench.common import STEPPED_ENGINE, CpuMeter, free_port, stack
from mistral_serve.frontend.openai_http.responses import ChunkWriter
from mistral_serve.v1 import chat_pb2, chat_pb2_grpc


async def http_streams(port: int, streams: int, tokens: int) -> int:
    body = {"messages": [{"role": "user", "content": "go"}], "max_tokens": tokens, "stream": True}
    url = f"http://127.0.0.1:{port}/v1/chat/completions"

    async def one(session: aiohttp.ClientSession) -> int:
        chunks = 0
        async with session.post(url, json=body) as response:
            async for line in response.content:
                chunks += line.startswith(b"data: ")
        return chunks

    async with aiohttp.ClientSession() as session:
        return sum(await asyncio.gather(*(one(session) for _ in range(streams))))


async def grpc_streams(port: int, streams: int, tokens: int) -> int:
    request = chat_pb2.ChatStreamRequest(
        request=chat_pb2.ChatRequest(
            messages=[chat_pb2.Message(role=chat_pb2.ROLE_USER, content=[chat_pb2.ContentPart(text="go")])],
            sampling=chat_pb2.SamplingParams(max_tokens=tokens),
        )
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)

        async def one() -> int:
            return len([event async for event in stub.ChatStream(request)])

        return sum(await asyncio.gather(*(one() for _ in range(streams))))


def json_cost_us() -> dict[str, float]:
    writer = ChunkWriter("0" * 32, "mistralai/Mistral-Small-3.2-24B-Instruct-2506", 1_700_000_000, False)
    delta = chat_pb2.Delta(sequence=42, text=" hello world", token_count=2)
    chunk = {
        "id": "chatcmpl-x",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "delta": {"content": " hello"}, "logprobs": None, "finish_reason": None}],
    }
    n = 100_000
    out = {"ChunkWriter.delta": timeit.timeit(lambda: writer.delta(delta), number=n) / n * 1e6}
    import json

    out["json.dumps"] = timeit.timeit(lambda: json.dumps(chunk, separators=(",", ":")), number=n) / n * 1e6
    try:
        import orjson

        out["orjson.dumps"] = timeit.timeit(lambda: orjson.dumps(chunk), number=n) / n * 1e6
    except ImportError:
        pass
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=500)
    args = parser.parse_args()
    http_port = free_port()
    settings = {
        "MISTRAL_SERVE_ENGINE": STEPPED_ENGINE,
        "MISTRAL_SERVE_HTTP_PORT": str(http_port),
        "STEPPED_TOKENS_PER_S": "500",
        "MISTRAL_SERVE_MAX_BACKLOG": str(args.streams * 4),
    }
    with stack("http-chunk-cost", settings=settings) as running:
        meter = CpuMeter({"frontend": running.frontend_pids})
        doors: tuple[tuple[str, Callable[[], Coroutine[Any, Any, int]]], ...] = (
            ("grpc", lambda: grpc_streams(running.frontend_ports[0], args.streams, args.tokens)),
            ("http", lambda: http_streams(http_port, args.streams, args.tokens)),
        )
        for door, run in doors:
            asyncio.run(run())  # warm up
            meter.start()
            chunks = asyncio.run(run())
            used = meter.stop()
            print(f"{door}: {chunks} chunks, frontend {used['frontend'] / chunks * 1e6:.1f} us CPU per chunk")
    for name, us in json_cost_us().items():
        print(f"{name}: {us:.2f} us per chunk")


if __name__ == "__main__":
    main()
