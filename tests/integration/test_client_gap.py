"""ChatClient never passes a gap on: it reattaches after the last delta it received (a real grpc.aio
server on port 0 that sends a gap on purpose)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from mistral_serve.client import ChatClient
from mistral_serve.v1 import chat_pb2
from tests.support.requests import chat


def delta(n: int) -> chat_pb2.ChatEvent:
    return chat_pb2.ChatEvent(delta=chat_pb2.Delta(sequence=n, text=f" t{n}"))


class GappyService:
    """Only ChatStream, registered by hand below."""

    def __init__(self) -> None:
        self.calls: list[chat_pb2.ChatStreamRequest] = []

    async def ChatStream(
        self, request: chat_pb2.ChatStreamRequest, context: object
    ) -> AsyncIterator[chat_pb2.ChatEvent]:
        self.calls.append(request)
        yield chat_pb2.ChatEvent(started=chat_pb2.Started(request_id="r1"))
        if request.WhichOneof("kind") == "request":
            for event in (delta(1), delta(2), delta(4), delta(5)):  # 3 is missing
                yield event
            return
        for n in range(request.reattach.last_sequence + 1, 6):
            yield delta(n)
        yield chat_pb2.ChatEvent(finished=chat_pb2.Finished(finish_reason=chat_pb2.FINISH_REASON_STOP))


async def test_the_client_reattaches_after_a_gap_instead_of_passing_it_on() -> None:
    service = GappyService()
    server = grpc.aio.server()
    handler = grpc.unary_stream_rpc_method_handler(
        service.ChatStream,
        request_deserializer=chat_pb2.ChatStreamRequest.FromString,
        response_serializer=chat_pb2.ChatEvent.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("mistral_serve.v1.ChatService", {"ChatStream": handler})]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with ChatClient(f"127.0.0.1:{port}", backoff_s=0.01) as client:
            events = [e async for e in client.stream(chat("hello"), timeout_s=10)]
    finally:
        await server.stop(None)
    assert [e.delta.sequence for e in events if e.WhichOneof("event") == "delta"] == [1, 2, 3, 4, 5]
    assert events[-1].WhichOneof("event") == "finished"
    assert service.calls[1].reattach.last_sequence == 2
