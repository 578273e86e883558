"""What a session holds once a request is done, and what a huge request costs the event loop before
it is sent off the loop: nothing in proportion to its arguments (issue 22's stall of another client)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from redisguard.commands.table import CommandTable
from redisguard.protocol.resp import encode_command
from redisguard.session.effects import Offload
from redisguard.session.pipeline import OFFLOAD_ARGC, OFFLOAD_NS, cost_of
from redisguard.session.state import NO_REQUEST
from tests.session.test_effects import session


class Untouchable(list[bytes]):
    """A request whose arguments must not be looked at one by one (only counted)."""

    def __iter__(self) -> Iterator[bytes]:
        raise AssertionError("walked every argument of a request that is decided off the loop")


def test_a_huge_request_is_costed_by_its_count_alone(table: CommandTable) -> None:
    s = session(table)
    huge = Untouchable([b"MGET", *[b"k"] * (OFFLOAD_ARGC + 1)])
    assert cost_of(s.user).of(huge) > OFFLOAD_NS and cost_of(s.user).over(huge)
    assert cost_of(s.user).of([b"MGET", *[b"k"] * 100]) <= OFFLOAD_NS


@pytest.mark.parametrize("n", [10, OFFLOAD_ARGC + 10])
def test_the_request_decided_is_not_kept(table: CommandTable, n: int) -> None:
    s = session(table)
    s.client_data(encode_command([b"DEL", *[b"k%d" % i for i in range(n)]]))
    if isinstance(s.effect, Offload):
        s.offloaded(*s.decide_offloaded(s.effect.argv))
    assert s.data_for_upstream().startswith(b"*%d\r\n$3\r\nDEL\r\n" % (n + 1))
    assert s.state.last is NO_REQUEST and s.susp.decided is None


def test_a_disconnected_client_lets_go_of_its_half_read_request(table: CommandTable) -> None:
    s = session(table)
    s.client_data(b"*100000\r\n" + b"$1\r\nk\r\n" * 50_000)  # half of a request
    assert s.pipeline.parser.buffered or not s.pipeline.parser.idle
    s.kill()
    assert s.pipeline.parser.idle and s.pipeline.parser.buffered == 0 and s.state.last is NO_REQUEST
