"""The reply queue alone, with a fake owner: Redis's bytes matched to what the client is owed, replies
made here slotted in order, out-of-band frames relayed as they come."""

from __future__ import annotations

from dataclasses import dataclass, field

from redisguard.session.replies import AUTHCHECK, EXEC_SUBS, PUBSUB, RELAY, SWALLOW, ReplyQueue


@dataclass
class Owner:
    resp: int = 2
    subscribed: bool = False
    execs: list[bytes] = field(default_factory=list)
    refused: int = 0
    latencies: list[float] = field(default_factory=list)

    def exec_done(self, frame: bytes) -> None:
        self.execs.append(frame)

    def upstream_auth_refused(self) -> None:
        self.refused += 1

    def reply_latency(self, seconds: float) -> None:
        self.latencies.append(seconds)


def out(q: ReplyQueue) -> bytes:
    data = b"".join(q.to_client)
    q.to_client.clear()
    return data


def test_a_refusal_waits_for_the_replies_owed_before_it() -> None:
    q = ReplyQueue(Owner())
    q.expect(RELAY)
    q.synth(b"-NOPERM no\r\n")
    q.expect(RELAY)
    assert out(q) == b""  # nothing to send before the first upstream reply
    q.data(b"$1\r\na\r\n")
    assert out(q) == b"$1\r\na\r\n-NOPERM no\r\n"
    q.data(b"$1\r\nb\r\n")
    assert out(q) == b"$1\r\nb\r\n" and not q.slots


def test_frames_split_anywhere_are_relayed_whole_and_in_order() -> None:
    replies = b"*2\r\n$1\r\nx\r\n:5\r\n+OK\r\n$-1\r\n"
    for cut in range(1, len(replies)):
        q = ReplyQueue(Owner())
        q.expect(RELAY, 2)
        q.synth(b"-ERR made here\r\n")
        q.expect(RELAY)
        q.data(replies[:cut])
        q.data(replies[cut:])
        assert out(q) == b"*2\r\n$1\r\nx\r\n:5\r\n+OK\r\n-ERR made here\r\n$-1\r\n", cut


def test_resp3_pushes_are_out_of_band() -> None:
    q = ReplyQueue(Owner(resp=3))
    q.expect(RELAY)
    q.synth(b"-ERR after\r\n")
    push = b">3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$1\r\nm\r\n"
    q.data(push)  # a message, not the reply to the request
    assert out(q) == push and q.slots
    q.data(b"+OK\r\n")
    assert out(q) == b"+OK\r\n-ERR after\r\n"


def test_resp2_messages_count_only_while_subscribed() -> None:
    message = b"*3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$1\r\nm\r\n"
    q = ReplyQueue(Owner(subscribed=False))
    q.expect(RELAY)
    q.data(message)  # not subscribed: a reply that happens to start with "message"
    assert out(q) == message and not q.slots
    q = ReplyQueue(Owner(subscribed=True))
    q.expect(RELAY)
    q.data(message)
    assert out(q) == message and q.slots  # a message: the reply is still owed


def test_subscribe_confirmations_answer_their_command() -> None:
    q = ReplyQueue(Owner(resp=3))
    q.expect(PUBSUB, 2)
    q.synth(b"+after\r\n")
    conf = b">3\r\n$9\r\nsubscribe\r\n$1\r\na\r\n:1\r\n>3\r\n$9\r\nsubscribe\r\n$1\r\nb\r\n:2\r\n"
    q.data(conf)
    assert out(q) == conf + b"+after\r\n" and q.pubsub_owed == 0


def test_swallowed_replies_never_reach_the_client() -> None:
    q = ReplyQueue(Owner())
    q.expect(SWALLOW, 2)
    q.expect(RELAY)
    q.data(b"-ERR wrong number of arguments for 'get' command\r\n-EXECABORT x\r\n+PONG\r\n")
    assert out(q) == b"+PONG\r\n"


def test_exec_with_subscriptions_tells_its_owner() -> None:
    owner = Owner()
    q = ReplyQueue(owner)
    q.expect(EXEC_SUBS)
    q.data(b"*1\r\n*3\r\n$9\r\nsubscribe\r\n$2\r\nch\r\n:1\r\n")
    assert owner.execs == [b"*1\r\n*3\r\n$9\r\nsubscribe\r\n$2\r\nch\r\n:1\r\n"] and out(q) == owner.execs[0]


def test_a_refused_upstream_login_closes_with_one_line() -> None:
    owner = Owner()
    q = ReplyQueue(owner)
    q.expect(AUTHCHECK)
    q.expect(RELAY)
    q.data(b"-WRONGPASS invalid username-password pair or user is disabled.\r\n")
    assert owner.refused == 1 and q.closing
    assert out(q) == b"-ERR redisguard: upstream authentication failed; check [upstream] username and password\r\n"


def test_close_after_waits_for_what_is_owed() -> None:
    q = ReplyQueue(Owner())
    q.expect(RELAY)
    q.synth(b"+OK\r\n")  # QUIT's
    q.close_after()
    assert not q.closing
    q.data(b":1\r\n")
    assert out(q) == b":1\r\n+OK\r\n" and q.closing


def test_an_upstream_failure_mid_frame_adds_no_line_to_half_a_reply() -> None:
    q = ReplyQueue(Owner())
    q.expect(RELAY)
    q.data(b"$10\r\nhalf")
    q.failed("redisguard: upstream closed the connection")
    assert out(q) == b"$10\r\nhalf" and q.closing
    q = ReplyQueue(Owner())
    q.expect(RELAY)
    q.failed("redisguard: upstream closed the connection")
    assert out(q) == b"-ERR redisguard: upstream closed the connection\r\n"
