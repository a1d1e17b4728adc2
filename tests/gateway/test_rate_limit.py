"""Invocation rate limits (NVCF `rateLimit`): the limiter on its own, then through a served gateway."""

from __future__ import annotations

import pytest

from api.gateway.rate_limit import RateLimit, parse_rate
from tests.gateway.helpers import auth, route, serve_gateway, uid

S = 10**9
"""One second in the limiter's monotonic nanoseconds."""
LONG_UPTIME = 400 * 86400 * S
"""Bursts must be exact however long the process has run (float seconds would round them off)."""


def admitted(limit: RateLimit, account: str, times: list[float], key: str = "key") -> list[bool]:
    return [limit.admit(account, key, LONG_UPTIME + round(t * S)) is None for t in times]


def test_a_burst_up_to_the_count_then_the_steady_rate() -> None:
    limit = RateLimit({"rateLimit": "5-S"})
    assert admitted(limit, "acme", [100.0] * 6) == [True] * 5 + [False]
    assert limit.admit("acme", "key", LONG_UPTIME + 100 * S) == 1  # seconds to wait, rounded up
    assert admitted(limit, "acme", [100.1]) == [False]
    assert admitted(limit, "acme", [100.2, 100.2]) == [True, False]  # one slot back every 0.2 s
    assert admitted(limit, "acme", [101.2] * 6) == [True] * 5 + [False]


@pytest.mark.parametrize("rate", ["13-M", "500-M", "999-H", "1000-S", "10-S", "7-D", "100000-D"])
def test_a_burst_of_exactly_the_count_passes(rate: str) -> None:
    count = int(rate.split("-")[0])
    limit = RateLimit({"rateLimit": rate})
    assert sum(admitted(limit, "acme", [3.0] * (count + 1))) == count


def test_every_window_applies() -> None:
    limit = RateLimit({"rateLimit": "3-S,4-M"})
    assert admitted(limit, "acme", [0.0, 0.0, 0.0, 0.0]) == [True, True, True, False]
    assert admitted(limit, "acme", [2.0, 2.0]) == [True, False]  # the minute's four are used
    assert admitted(limit, "acme", [17.0]) == [True]  # 15 s per request at 4 a minute


def test_limits_are_per_account_with_exemptions_and_own_rates() -> None:
    limit = RateLimit(
        {"rateLimit": "1-S", "exemptedNcaIds": ["ops"], "perNcaIdRate": {"big": "3-S"}, "syncCheck": False}
    )
    assert admitted(limit, "acme", [0.0, 0.0]) == [True, False]
    assert admitted(limit, "other", [0.0]) == [True]
    assert admitted(limit, "ops", [0.0] * 50) == [True] * 50
    assert admitted(limit, "big", [0.0] * 4) == [True, True, True, False]


def test_per_user_rate_limits_each_key_and_refusals_cost_nothing() -> None:
    limit = RateLimit({"rateLimit": "10-S", "perUserRate": "2-S"})
    assert admitted(limit, "acme", [0.0] * 3, key="a") == [True, True, False]
    assert admitted(limit, "acme", [0.0] * 3, key="b") == [True, True, False]
    # The refused requests took nothing from the account's 10: three more keys get two each.
    counts = [sum(admitted(limit, "acme", [0.0] * 2, key=f"k{i}")) for i in range(5)]
    assert counts == [2, 2, 2, 0, 0]


def test_replicas_share_the_rate() -> None:
    """Two replicas: each admits half, also below one request per window (1-S: one per 2 s each)."""
    half = RateLimit({"rateLimit": "10-S"}, replicas=2)
    assert sum(admitted(half, "acme", [0.0] * 10)) == 5
    single = RateLimit({"rateLimit": "1-S"}, replicas=2)
    assert admitted(single, "acme", [0.0, 1.0, 1.999, 2.0]) == [True, False, False, True]


def test_invalid_limits_are_ignored_not_fatal() -> None:
    assert RateLimit.from_route({"rateLimit": "9" * 400 + "-S"}, 1) is None
    assert RateLimit.from_route({"rateLimit": "1-S", "perNcaIdRate": {"a": "often"}}, 1) is None
    assert RateLimit.from_route(None, 1) is None
    limit = RateLimit.from_route({"rateLimit": "1-S"}, 1)
    assert limit is not None and limit.text == "1-S"


@pytest.mark.parametrize("text", ["0-S", "5", "5-X", "-S", "1000000001-S"])
def test_invalid_rates_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_rate(text)


async def test_the_gateway_answers_429_with_retry_after(echo_urls: list[str]) -> None:
    async with serve_gateway() as gw:
        version, function = uid("ver"), uid()
        memo = route(version, echo_urls[:1], function_id=function, concurrency=4)
        memo["rateLimit"] = {"rateLimit": "2-M"}
        gw.apply(memo)
        path = f"/v2/nvcf/pexec/functions/{function}"
        answers = [await gw.http.post(path, json={"n": n}) for n in range(3)]
        assert [a.status_code for a in answers] == [200, 200, 429]
        refused = answers[2]
        assert refused.headers["content-type"].startswith("application/problem+json")
        assert refused.json()["status"] == 429 and "2-M" in refused.json()["detail"]
        assert 1 <= int(refused.headers["retry-after"]) <= 30
        # Another account is not limited by this one's requests; lifting the limit admits at once.
        assert (await gw.http.post(path, json={}, headers=auth("key-admin"))).status_code == 200
        memo["rateLimit"] = None
        gw.apply(memo)
        assert (await gw.http.post(path, json={"n": 4})).status_code == 200
