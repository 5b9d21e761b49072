"""An in-process stack: a real grpc.aio frontend on port 0 and workers with the scripted engine,
both talking to the session's real redis-server."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

import pytest

from mistral_serve.client import ChatClient
from mistral_serve.frontend.server import Frontend, start_frontend
from mistral_serve.frontend.settings import FrontendSettings
from mistral_serve.worker.app import Worker, start_worker
from mistral_serve.worker.settings import WorkerSettings
from tests.support.scripted_engine import ScriptedEngine


@dataclass
class Stack:
    redis_url: str
    # Other Redis settings of both processes (mode, TLS, sentinels): tests/support/redis_topologies.py.
    redis_settings: dict[str, Any] = field(default_factory=dict)
    frontends: list[Frontend] = field(default_factory=list)
    workers: list[Worker] = field(default_factory=list)
    clients: list[ChatClient] = field(default_factory=list)

    async def frontend(self, **overrides: Any) -> Frontend:
        settings = replace(
            FrontendSettings(
                redis_url=self.redis_url,
                grpc_host="127.0.0.1",
                grpc_port=0,
                drain_grace_s=1.0,
                health_interval_s=0.1,
                metrics_port=0,  # a free port each: in-process stacks never collide
                http_port=0,
                metrics_host="127.0.0.1",
            ),
            **{**self.redis_settings, **overrides},
        )
        frontend = await start_frontend(settings)
        self.frontends.append(frontend)
        return frontend

    async def worker(self, engine: ScriptedEngine | None = None, **overrides: Any) -> Worker:
        settings = replace(
            WorkerSettings(
                redis_url=self.redis_url,
                health_host="127.0.0.1",
                health_port=0,
                block_ms=200,
                drain_grace_s=1.0,
                metrics_port=0,
                metrics_host="127.0.0.1",
            ),
            **{**self.redis_settings, **overrides},
        )
        worker = await start_worker(settings, engine or ScriptedEngine())
        self.workers.append(worker)
        return worker

    def client(self, frontend: Frontend, **kwargs: Any) -> ChatClient:
        client = ChatClient(f"127.0.0.1:{frontend.port}", **kwargs)
        self.clients.append(client)
        return client

    async def close(self) -> None:
        for client in self.clients:
            await client.close()
        for worker in self.workers:
            await worker.stop(grace_s=0)
        for frontend in self.frontends:
            await frontend.stop(grace_s=0)


@pytest.fixture
async def stack(redis_url: str) -> AsyncIterator[Stack]:
    built = Stack(redis_url)
    yield built
    await built.close()
