"""The soak's short version: 64 streams through three worker kills (SIGKILL), 8 s apart, lose nothing."""

from __future__ import annotations

from tests.soak.run import soak


async def test_short_soak_loses_and_duplicates_nothing(redis_server: object) -> None:
    tally = await soak(kills=3, streams=64, kill_every_s=8, rate=20)
    report = tally.report()
    assert tally.worker_kills == 3, report
    assert tally.admitted > 64, report
    assert tally.completed == tally.admitted, report
    assert tally.failed == {}, report
    assert tally.tokens_lost == 0 and tally.tokens_duplicated == 0, report
