"""The request pipeline both front doors share: a ChatRequest, its caller and deadline in, ChatEvents out.

It never sees a transport. The gRPC servicer and the OpenAI HTTP handlers translate their wire format
into a ChatRequest, make one call here, and translate the events back. The field paths of the errors
raised here are relative to the ChatRequest (`messages[0].content[1]`) or to the reattach
(`last_sequence`); each door names them its own way once, at its boundary.
"""

from __future__ import annotations

import asyncio
import enum
import hmac
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from typing import Protocol

from google.rpc import code_pb2

from mistral_serve.common.contract import error_event
from mistral_serve.common.quota import Quota
from mistral_serve.v1 import chat_pb2

from .callers import Caller
from .errors import BackendUnavailable, FieldViolation, InvalidRequest, NotConfigured, NotFound
from .fanout import EventFanout, Owner, Subscription, lost_event
from .idempotency import Idempotency, fingerprint
from .image_urls import ImageFetcher, resolve_image_urls
from .queue import RequestQueue
from .request_form import FrontDoorRequest, build_request_form
from .settings import FrontendSettings
from .validation import Limits, check_budget, validate_chat_request

log = logging.getLogger(__name__)


class TokenCounter(Protocol):
    """Encodes a request's prompt (text and images) the way the worker's prompt builder does
    (`token_count.TokenCounter`, which loads mistral_common: imported only where one is used)."""

    @property
    def fingerprint(self) -> str: ...

    def cheap(self, form: FrontDoorRequest) -> bool: ...

    def encode(self, form: FrontDoorRequest) -> list[int]: ...

    def counted(self, tokens: Sequence[int]) -> chat_pb2.CountTokensResponse: ...


TERMINAL = ("finished", "error")
# Queued to a subscription by its stream's deadline timer (compared by identity).
_DEADLINE_PASSED: list[chat_pb2.ChatEvent] = []


class ChatPipeline:
    def __init__(
        self,
        settings: FrontendSettings,
        queue: RequestQueue,
        fanout: EventFanout,
        token_counter: TokenCounter | None,
        *,
        fetcher: ImageFetcher | None = None,
        idempotency: Idempotency | None = None,
    ) -> None:
        self._settings = settings
        self._limits = Limits.from_settings(settings)
        self._queue = queue
        self._fanout = fanout
        self._token_counter = token_counter
        self._fetcher = fetcher
        self._idempotency = idempotency
        # Cancels run after their caller is gone; hold them so they are not garbage collected.
        self._cancels: set[asyncio.Task[None]] = set()

    def deadline(self, remaining_s: float | None) -> float:
        """The absolute deadline of a call with `remaining_s` left (None: the service's default)."""
        return time.time() + (self._settings.default_deadline_s if remaining_s is None else remaining_s)

    async def chat(self, request: chat_pb2.ChatRequest, *, caller: Caller, deadline: float) -> EventStream:
        """Check and queue `request` as `caller`'s; its events, `started` first. Raises a
        ServiceError if refused (QuotaExceeded when the caller is at a limit of its quota)."""
        admitted = await self._front_door(request)
        limits = caller.quota if caller.quota is not None else self._settings.default_quota
        _check_cost_fits(admitted.queued.cost_tokens, limits)
        admitted.queued.caller = caller.identity
        return await self._run(request, admitted, caller, limits, deadline)

    async def reattach(
        self, request_id: str, last_sequence: int, *, caller: str, deadline: float
    ) -> EventStream:
        """The rest of a request `caller` started: `started`, the deltas after `last_sequence`, the end."""
        await self._check_owner(request_id, caller)
        return await self._attach(request_id, deadline, last_sequence=last_sequence, owner=caller)

    async def cancel(self, request_id: str, *, caller: str) -> None:
        """End a request `caller` started, attached or not. Idempotent."""
        await self._check_owner(request_id, caller)
        await self._queue.cancel(request_id)

    async def count_tokens(self, request: chat_pb2.ChatRequest) -> chat_pb2.CountTokensResponse:
        if self._token_counter is None:
            validate_chat_request(request, limits=self._limits)
            raise NotConfigured("CountTokens needs MISTRAL_SERVE_TOKENIZER (the model's tekken.json)")
        form = await self._request_form(request)
        return self._token_counter.counted(await self._prompt_ids(self._token_counter, form))

    def model_info(self) -> chat_pb2.GetModelInfoResponse:
        s = self._settings
        return chat_pb2.GetModelInfoResponse(
            model=s.served_model_name,
            context_length=s.context_length,
            max_images_per_prompt=s.max_images_per_prompt,
            supports_tools=True,
            supports_images=s.max_images_per_prompt > 0,
            default_system_prompt=s.default_system_prompt,
        )

    async def _front_door(self, request: chat_pb2.ChatRequest) -> FrontDoorRequest:
        """Every check before a request may cost queue space: the request as it will be queued."""
        form = await self._request_form(request)
        counted = chat_pb2.CountTokensResponse()  # without a tokenizer the prompt counts as 0 tokens
        counter = self._token_counter
        if counter is not None:
            ids = await self._prompt_ids(counter, form)
            counted = counter.counted(ids)
            if not form.image_sizes:  # a worker decodes images itself, so it builds those prompts again
                form.queued.prompt_token_ids.extend(ids)
                form.queued.tokenizer_fingerprint = counter.fingerprint
        new_tokens = check_budget(counted, form.request, self._limits)
        # What fair queueing weighs the request by (and quotas charge): all the tokens it may take.
        form.queued.cost_tokens = counted.prompt_tokens + new_tokens
        return form

    @staticmethod
    async def _prompt_ids(counter: TokenCounter, form: FrontDoorRequest) -> list[int]:
        if counter.cheap(form):
            return counter.encode(form)
        return await asyncio.to_thread(counter.encode, form)

    async def _request_form(self, request: chat_pb2.ChatRequest) -> FrontDoorRequest:
        """Validate `request`, fetch its image URLs, and build the one form the rest works on."""
        images = validate_chat_request(request, limits=self._limits)
        if self._fetcher is not None:
            images |= await resolve_image_urls(request, self._fetcher)
        return build_request_form(
            request,
            images,
            max_total_image_bytes=self._settings.max_receive_message_bytes,
            default_system_prompt=self._settings.default_system_prompt,
        )

    async def _run(
        self,
        original: chat_pb2.ChatRequest,
        form: FrontDoorRequest,
        who: Caller,
        limits: Quota,
        deadline: float,
    ) -> EventStream:
        """Queue `form` within `limits`; `original` is what the caller sent: a repeat of its
        client_request_id follows the first run instead."""
        caller = who.identity
        request_id = uuid.uuid4().hex
        claim = None
        if self._idempotency is not None and original.client_request_id:
            claim = (caller, original.client_request_id, fingerprint(original), request_id)
            first_id = await self._idempotency.claim(*claim, path="")
            if first_id is not None:
                return await self._attach(first_id, deadline, last_sequence=0, owner=caller)
        queued = form.queued
        queued.request_id = request_id
        queued.deadline_unix = deadline
        queued.admitted_unix = time.time()
        queued.attempt = 1
        sub = self._fanout.open(request_id, owner=Owner(caller, deadline + self._settings.event_ttl_s))
        try:
            await self._queue.admit(queued, owner=caller, limits=limits, caller_label=who.metric_label)
        except BaseException:
            self._fanout.close(sub)
            if claim is not None and self._idempotency is not None:
                await self._idempotency.release(*claim)
            raise
        # A caller who goes away leaves the request running for the detach grace (they may
        # reattach); the attached key then lapses and a worker cancels it.
        return EventStream(self._fanout, sub, deadline, last_sequence=0, on_deadline=self._cancel_later)

    async def _attach(
        self, request_id: str, deadline: float, *, last_sequence: int, owner: str
    ) -> EventStream:
        """`started`, then the request's events after `last_sequence`: from Redis, then live."""
        history = await self._fanout.history(request_id)
        if last_sequence > history.last_sequence:
            raise InvalidRequest(
                [
                    FieldViolation(
                        "last_sequence",
                        f"{last_sequence} is beyond the {history.last_sequence} deltas this request "
                        "has sent; pass the sequence of the last delta you received",
                    )
                ]
            )
        sub = self._fanout.open(
            request_id,
            after_entry_id=history.last_entry_id,
            owner=Owner(owner, deadline + self._settings.event_ttl_s),
        )
        # Before any await: live batches the reader delivers from now on must queue behind the history.
        sub.batches.put_nowait(history.events)
        try:
            await self._fanout.attach_now(request_id)
        except BaseException:
            self._fanout.close(sub)
            raise
        return EventStream(self._fanout, sub, deadline, last_sequence=last_sequence)

    async def _check_owner(self, request_id: str, caller: str) -> None:
        """Raise NotFound unless `caller` started `request_id`: others learn nothing, not even that
        it exists."""
        owner = await self._queue.owner(request_id) if request_id else None
        if owner is None or not hmac.compare_digest(owner.encode(), caller.encode()):
            raise NotFound(f"no request {request_id!r} of yours is kept here")

    def _cancel_later(self, request_id: str) -> None:
        task = asyncio.get_running_loop().create_task(self._cancel(request_id))
        self._cancels.add(task)
        task.add_done_callback(self._cancels.discard)

    async def _cancel(self, request_id: str) -> None:
        try:
            await self._queue.cancel(request_id)
        except Exception:
            log.warning("could not mark request %s cancelled", request_id, exc_info=True)


def _check_cost_fits(cost_tokens: int, limits: Quota) -> None:
    """Refuse a request that costs more than its caller's bucket ever holds: no wait would let it in."""
    if limits.tokens_per_min is not None and cost_tokens > limits.tokens_per_min:
        raise InvalidRequest(
            [
                FieldViolation(
                    "sampling.max_tokens",
                    f"the request may use {cost_tokens} tokens (prompt and max_tokens), over the "
                    f"caller's quota of {limits.tokens_per_min} tokens per minute: lower max_tokens",
                )
            ]
        )


class EventStream:
    """One caller's copy of a request's events: `started`, the deltas after `last_sequence` in order,
    then the terminal event, or a DEADLINE_EXCEEDED error once the deadline passes.

    An async iterator written as a class rather than a generator, so that a streamed event passes
    through one plain method here. The door that got it must `close` it (contextlib.closing) when it
    stops reading early; reaching the terminal event closes it too.

    `on_deadline` is given the request id when the deadline passes: set when the deadline is the
    request's own (then passing it cancels the request); a reattached caller's deadline only ends
    its stream (detach).
    """

    def __init__(
        self,
        fanout: EventFanout,
        sub: Subscription,
        deadline: float,
        *,
        last_sequence: int,
        on_deadline: Callable[[str], None] | None = None,
    ) -> None:
        self.request_id = sub.request_id
        self._fanout = fanout
        self._sub: Subscription | None = sub
        self._last_sequence = last_sequence
        self._on_deadline = on_deadline
        self._pending: deque[chat_pb2.ChatEvent] = deque(
            [chat_pb2.ChatEvent(started=chat_pb2.Started(request_id=sub.request_id))]
        )
        # One timer for the whole stream, not a wait_for (a task and a timer) per batch: when the
        # deadline passes, a marker queues behind the batches that came before it.
        loop = asyncio.get_running_loop()
        self._deadline_timer: asyncio.TimerHandle | None = loop.call_at(
            loop.time() + max(deadline - time.time(), 0), sub.batches.put_nowait, _DEADLINE_PASSED
        )

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> chat_pb2.ChatEvent:
        while not self._pending:
            if self._sub is None:
                raise StopAsyncIteration
            await self._take_batch(self._sub)
        return self._pending.popleft()

    def close(self) -> None:
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
            self._deadline_timer = None
        if self._sub is not None:
            self._fanout.close(self._sub)
            self._sub = None

    async def _take_batch(self, sub: Subscription) -> None:
        batch = await sub.batches.get()
        if batch is _DEADLINE_PASSED:
            if self._on_deadline is not None:
                self._on_deadline(self.request_id)
            self._pending.append(
                error_event(code_pb2.DEADLINE_EXCEEDED, "the request's deadline passed", retryable=True)
            )
            self.close()
            return
        await self._deliver(batch)

    async def _deliver(self, batch: list[chat_pb2.ChatEvent]) -> None:
        """Queue `batch`'s new events for the caller, each delta last+1. A gap is never passed on as
        success: what Redis still holds fills it, or the stream ends with the one `lost` error."""
        for event in batch:
            accepted = self._accept(event)
            if accepted is _Accepted.GAP:
                filled = await self._fill_gap()
                if self._sub is None:  # what Redis holds reached the terminal event
                    return
                if not filled or self._accept(event) is _Accepted.GAP:
                    self._pending.append(lost_event())
                    self.close()
                    return
            if self._sub is None:  # the terminal event, queued by `_accept` or found by `_fill_gap`
                return

    def _accept(self, event: chat_pb2.ChatEvent) -> _Accepted:
        """Queue `event` if it comes next; a delta this caller has is dropped, one after a gap refused."""
        kind = event.WhichOneof("event")
        if kind == "delta":
            # A resumed, replayed or rewritten stream may repeat what this caller already has.
            if event.delta.sequence <= self._last_sequence:
                return _Accepted.DROPPED
            if event.delta.sequence != self._last_sequence + 1:
                return _Accepted.GAP
            self._last_sequence = event.delta.sequence
        self._pending.append(event)
        if kind in TERMINAL:
            self.close()
        return _Accepted.QUEUED

    async def _fill_gap(self) -> bool:
        """Queue the deltas after the last one sent from what Redis holds; whether that went on
        without a gap (to the end of what it holds, or to the terminal event)."""
        try:
            history = await self._fanout.history(self.request_id)
        except BackendUnavailable:
            return False
        for event in history.events:
            if self._accept(event) is _Accepted.GAP:
                return False
            if self._sub is None:
                return True
        return True


class _Accepted(enum.Enum):
    QUEUED = "queued"
    DROPPED = "dropped"
    GAP = "gap"
