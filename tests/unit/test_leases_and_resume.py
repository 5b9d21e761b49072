"""XAUTOCLAIM reply shapes, and what a resumed job reads back from its event records."""

from __future__ import annotations

from mistral_serve.queue.v1 import queue_pb2
from mistral_serve.v1 import chat_pb2
from mistral_serve.worker.jobs import Resume
from mistral_serve.worker.leases import parse_autoclaim


def test_redis_6_2_reply_keeps_deleted_entries_for_the_ack() -> None:
    reply = [b"0-0", [[b"1-1", [b"r", b"payload"]], [b"2-1", None]]]
    cursor, entries = parse_autoclaim(reply)
    assert cursor == b"0-0"
    assert entries == [(b"1-1", {b"r": b"payload"}), (b"2-1", None)]


def test_redis_7_reply_leaves_deleted_ids_to_redis() -> None:
    reply = [b"5-0", [[b"1-1", [b"r", b"payload", b"x", b"y"]]], [b"2-1", b"3-1"]]
    cursor, entries = parse_autoclaim(reply)
    assert cursor == b"5-0"
    assert entries == [(b"1-1", {b"r": b"payload", b"x": b"y"})]


def delta(sequence: int, text: str) -> chat_pb2.ChatEvent:
    return chat_pb2.ChatEvent(delta=chat_pb2.Delta(sequence=sequence, text=text))


def test_resume_gathers_tokens_raw_text_and_last_sequence_in_order() -> None:
    records = [
        queue_pb2.EventRecord(events=[delta(1, "Hel")], token_ids=[10], raw_text="Hel"),
        queue_pb2.EventRecord(
            events=[delta(2, "lo"), delta(3, " you")], token_ids=[11, 12], raw_text="lo you"
        ),
    ]
    resume = Resume.from_records(records)
    assert resume == Resume(sequence=3, token_ids=(10, 11, 12), raw_text="Hello you", finished=False)


def test_resume_sees_a_terminal_event_written_before_the_worker_died() -> None:
    records = [
        queue_pb2.EventRecord(events=[delta(1, "a")], token_ids=[1], raw_text="a"),
        queue_pb2.EventRecord(events=[chat_pb2.ChatEvent(finished=chat_pb2.Finished())]),
    ]
    assert Resume.from_records(records).finished
