"""The session fuzzed, sans-IO: whatever the bytes, cut wherever, nothing bob may not run reaches Redis,
and nothing escapes."""

from __future__ import annotations

import os

from hypothesis import given, settings
from hypothesis import strategies as st

from redisguard.policy.decide import decide
from redisguard.protocol.resp import encode_command
from redisguard.session.effects import carry_out
from tests.session.conftest import forwarded, session

PIECES = [
    encode_command([b"GET", b"report:1"]), encode_command([b"GET", b"secret"]), encode_command([b"SET", b"report:1", b"x"]),
    encode_command([b"FLUSHALL"]), encode_command([b"MULTI"]), encode_command([b"EXEC"]),
    encode_command([b"CLIENT", b"REPLY", b"SKIP"]), encode_command([b"CLIENT", b"REPLY", b"OFF"]),
    encode_command([b"CLIENT", b"REPLY", b"ON"]), encode_command([b"HELLO", b"3"]), encode_command([b"RESET"]),
    encode_command([b"AUTH", b"alice", b"wrong"]), encode_command([b"AUTH", b"bob", b"bob-pw"]),
    b"GET report:2\r\n", b"FLUSHALL\r\n", b"~2\r\n$3\r\nGET\r\n$8\r\nreport:1\r\n", b"|1\r\n+x\r\n:1\r\n",
    b"%1\r\n*1\r\n$1\r\na\r\n$1\r\nb\r\n", b"*1\r\n", b"$4\r\n", b"\r\n", b"\x00", b"*0\r\n", b"PING\n",
    b"*2\r\n$3\r\nGET\r\n$3\r\nab\r\n", b'"open\r\n', b">1\r\n+a\r\n",
]  # fmt: skip


# CI runs a bounded budget; a longer run: REDISGUARD_FUZZ_EXAMPLES=200000 pytest tests/session/test_session_fuzz.py
FUZZ_EXAMPLES = int(os.environ.get("REDISGUARD_FUZZ_EXAMPLES", "400"))


@settings(max_examples=FUZZ_EXAMPLES, deadline=None)
@given(st.lists(st.sampled_from(PIECES), max_size=12), st.lists(st.integers(1, 300), max_size=5))
def test_fuzz_nothing_denied_reaches_redis(pieces: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(pieces)
    s = session()
    user = s.user
    bounds = sorted({c for c in cuts if c < len(stream)})
    for a, b in zip([0, *bounds], [*bounds, len(stream)], strict=True):
        s.client_data(stream[a:b])
        while s.paused:
            carry_out(s)
    for argv in forwarded(s):
        if argv[0].upper() in (b"AUTH", b"DISCARD", b"UNWATCH"):
            continue  # the proxy's own AUTH as the service user, and the DISCARD of an aborted EXEC
        if argv[0].upper() == b"RESET":
            break  # after RESET the session is `default` (off): the rest was decided for it
        v = decide(s.policy, user, argv, False)
        assert v.error is None, (argv, v)
