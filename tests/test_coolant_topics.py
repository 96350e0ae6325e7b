"""Topics: absurd lengths are refused and counted, and what the parser remembers is bounded by bytes."""

from __future__ import annotations

import gc
import json
import tracemalloc

from agentd.clock import FakeClock
from agentd.config import AgentConfig
from agentd.coolant_ingest import CoolantIngest
from collectors.coolant import REASONS, CoolantParser, Subscription

NOW_NS = 1_767_225_600 * 10**9
MAX_TOPIC_CHARS = 1024  # the documented limit (collectors.coolant.MAX_TOPIC_CHARS)
GOOD = json.dumps({"supply_temp_c": 30.0, "return_temp_c": 38.0}).encode()


def ingest() -> CoolantIngest:
    cfg = AgentConfig.model_validate({"node": "n1", "site": "s0", "coolant": {"subscriptions": [
        {"topic": "cooling/#", "tags": {"loop": "tcs", "unit": "u"}}]}})
    return CoolantIngest(cfg, FakeClock(start_wall_ns=NOW_NS))


def retained_bytes(feed) -> int:
    """Bytes still allocated after ``feed()`` ran (its garbage collected)."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        feed()
        gc.collect()
        return tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


def test_a_topic_over_the_limit_is_refused_counted_and_the_subscriber_goes_on():
    from structlog.testing import capture_logs

    ing = ingest()
    long_topic = "cooling/" + "x" * 60_000
    with capture_logs() as logs:
        ing.handle_batch([("cooling/a", GOOD), (long_topic, GOOD), ("cooling/b", GOOD)])
    assert ing.bad == {"topic_too_long": 1} and ing.readings == 2 and ing.msgs == 3
    assert "topic_too_long" in REASONS and ing.agent_fields()["coolant_bad_topic_too_long"] == 1
    (log,) = logs
    assert log["reason"] == "topic_too_long" and len(log["topic"]) == 200  # logged, truncated
    assert f"{MAX_TOPIC_CHARS} character limit" in log["detail"]
    from collectors.coolant import MAX_TOPIC_CHARS as limit

    assert limit == MAX_TOPIC_CHARS
    ok = "cooling/" + "y" * (MAX_TOPIC_CHARS - len("cooling/"))  # exactly at the limit: fine
    ing.handle_batch([(ok, GOOD)])
    assert ing.readings == 3


def test_5000_messages_on_60kb_topics_keep_no_memory():
    ing = ingest()
    messages = ((f"cooling/{i}/" + "z" * 60_000, GOOD) for i in range(5_000))  # made one at a time
    grown = retained_bytes(lambda: ing.handle_batch(messages))
    assert grown < 1 << 20, grown  # the old parser kept ~4,096 of them with their levels (~490 MB)
    assert ing.bad == {"topic_too_long": 5_000}


def test_the_topic_memo_is_bounded_by_bytes_for_long_distinct_topics_under_the_limit():
    parser = CoolantParser([Subscription("cooling/#", "json", tags={"loop": "tcs", "unit": "u"})])

    def topic(i: int) -> str:
        return f"cooling/{i}/" + "/".join(["l" * 90] * 10)  # ~920 characters, 12 levels

    assert len(topic(4_000)) <= MAX_TOPIC_CHARS

    def feed() -> None:
        for i in range(4_000):  # each topic made here, so only what the parser keeps stays
            readings, rejections = parser.parse(topic(i), GOOD, NOW_NS)
            assert len(readings) == 1 and rejections == []

    grown = retained_bytes(feed)
    assert grown < 2 << 20, grown  # old: all 4,000 topics with their 12 levels, ~10 MB
    assert parser.matcher.cache_bytes <= 1 << 20
    assert parser.match(topic(3_999)) is not None  # still matching, remembered or not
