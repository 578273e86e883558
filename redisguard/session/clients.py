"""Replies that name what is behind the proxy: CLIENT LIST/INFO/KILL and CLUSTER SHARDS.

Handlers of the session (functions of its :class:`~.core.Core`). Redis sees one upstream
connection per proxied client, all from the proxy's address (and in service mode all as the service
user); the client must see itself and the other proxied clients as a direct client of Redis would:

- each row of CLIENT LIST / CLIENT INFO that is one of this process's proxied clients (found by its
  upstream socket, Redis's ``addr=``, in ``Core.peers``) shows that client's own address (``addr``), the
  redisguard listener it reached (``laddr``) and its redisguard user (``user``); every other row —
  the proxy's own connections (health checks, mirror administration, the command table), replication,
  anyone on Redis's own ports, another worker's clients — is dropped: not the client's to see.
- CLIENT KILL's ``USER``/``ADDR``/``LADDR`` name redisguard users and addresses: the proxy picks the
  matching proxied clients itself and kills each by its upstream address, ``ID``/``TYPE`` still judged
  by Redis; one probe (the client's filters, ours replaced by an address no connection has) first
  lets Redis answer the syntax errors in its own order and words. So the count is Redis's, and only
  proxied clients can be killed.
- CLUSTER SHARDS: ``tls-port`` is Redis's own TLS port (tls-cluster); it becomes the node's ``port``
  (its sidecar's TLS listener, what the node announces to plaintext clients), or goes if there is none.

Limits: ``Core.peers`` is this process's (with ``[server] workers``, another worker's clients are not listed
nor killable), and a unix-socket upstream shows every connection at one address (Redis's socket path),
so there no row can be told apart and none is listed (CLIENT INFO, the caller's own, still is).

Only these commands are held and decoded (``ReplyQueue.rewrite``); everything else is relayed as sent.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from redisguard.commands.table import Command
from redisguard.protocol.resp import cstr, encode_command, error_format
from redisguard.session.core import Core
from redisguard.session.replies import SWALLOW
from redisguard.session.state import ClientState

NO_SUCH_CLIENT = b"-ERR No such client\r\n"
# The probe's ADDR: no connection has it (Redis formats addresses as ip:port, [ip6]:port or path:0).
NOWHERE = b"redisguard:none"
_KILL = [b"CLIENT", b"KILL"]


# -- RESP values, for the few replies that are rewritten (never on the common path) -------------
def _line(buf: bytes, pos: int) -> tuple[bytes, int]:
    end = buf.index(b"\r\n", pos)
    return buf[pos:end], end + 2


def parse(buf: bytes, pos: int = 0) -> tuple[Any, int]:
    """One RESP2/RESP3 value from a whole frame: ``(kind, header, items or body)``."""
    kind = buf[pos : pos + 1]
    head, pos = _line(buf, pos + 1)
    if kind in (b"$", b"=", b"!") and head != b"-1":
        n = int(head)
        return (kind, head, buf[pos : pos + n]), pos + n + 2
    if kind in (b"*", b"~", b">", b"%", b"|") and head != b"-1":
        count = int(head) * (2 if kind in (b"%", b"|") else 1)
        items = []
        for _ in range(count):
            item, pos = parse(buf, pos)
            items.append(item)
        return (kind, head, items), pos
    return (kind, head, None), pos


def encode(value: Any) -> bytes:
    kind: bytes
    head: bytes
    kind, head, body = value
    if body is None:
        return kind + head + b"\r\n"
    if isinstance(body, bytes):
        return b"%s%d\r\n%s\r\n" % (kind, len(body), body)
    n = len(body) // 2 if kind in (b"%", b"|") else len(body)
    return b"%s%d\r\n" % (kind, n) + b"".join(map(encode, body))


def _pairs(value: Any) -> list[Any] | None:
    """The flat key, value list of a RESP3 map or a RESP2 array of pairs."""
    kind, _, body = value
    return body if kind in (b"%", b"*") and isinstance(body, list) and len(body) % 2 == 0 else None


def _text(value: Any) -> bytes | None:
    text: bytes | None = value[2] if value[0] == b"$" else value[1] if value[0] == b"+" else None
    return text


def cluster_shards(frames: list[bytes]) -> bytes:
    """CLUSTER SHARDS with each node's ``tls-port`` naming its sidecar (its ``port``), not Redis."""
    frame = frames[0]
    if not frame.startswith((b"*", b"%")):
        return frame  # an error: as Redis sent it
    reply, _ = parse(frame)
    for shard in reply[2] or ():
        fields = _pairs(shard) or []
        for i in range(0, len(fields), 2):
            if _text(fields[i]) == b"nodes" and isinstance(fields[i + 1][2], list):
                for node in fields[i + 1][2]:
                    _sidecar_tls_port(_pairs(node))
    return encode(reply)


def _sidecar_tls_port(fields: list[Any] | None) -> None:
    if fields is None:
        return
    keys = [_text(k) for k in fields[::2]]
    if b"tls-port" not in keys:
        return
    i = 2 * keys.index(b"tls-port")
    if b"port" in keys:
        fields[i + 1] = fields[2 * keys.index(b"port") + 1]
    else:
        del fields[i : i + 2]


# -- CLIENT LIST / INFO rows ----------------------------------------------------------------------
def _field(name: bytes, fields: list[bytes]) -> bytes | None:
    return next((f[len(name) :] for f in fields if f.startswith(name)), None)


def client_rows(body: bytes, peers: dict[bytes, ClientState], me: ClientState, my_user: bytes,
                only_me: bool = False) -> bytes:  # fmt: skip
    """The rows of proxied clients, each naming the client, its listener and its redisguard user (the
    caller's: ``my_user``, the one it had when it asked, as Redis would show it)."""
    out = []
    for line in body.split(b"\n"):
        fields = line.split(b" ")
        s = me if only_me else peers.get(_field(b"addr=", fields) or b"")
        if not line or s is None:
            continue
        shown = {b"addr=": s.addrs[0], b"laddr=": s.addrs[1], b"user=": my_user if s is me else s.user.name.encode()}
        out.append(b" ".join(f[: f.index(b"=") + 1] + shown[f[: f.index(b"=") + 1]]
                             if f[: f.find(b"=") + 1] in shown else f for f in fields) + b"\n")  # fmt: skip
    return b"".join(out)


def _string_reply(frame: bytes, rows: Callable[[bytes], bytes]) -> bytes:
    """A bulk (RESP2) or verbatim (RESP3, ``txt:``) string, its text rewritten by ``rows``."""
    if frame[:1] not in (b"$", b"="):
        return frame  # an error (or a nil): as Redis sent it
    kind, _, body = parse(frame)[0]
    prefix = b"txt:" if kind == b"=" and body.startswith(b"txt:") else b""
    return encode((kind, b"", prefix + rows(body[len(prefix) :])))


def _forward_rewritten(c: Core, commands: Sequence[list[bytes]], fn: Callable[[list[bytes]], bytes]) -> None:
    """Send ``commands`` upstream; their replies reach the client as ``fn`` of them, one reply."""
    c.open_upstream()
    c.to_upstream.extend(encode_command(cmd) for cmd in commands)
    if c.state.reply_off:
        return
    if c.state.skipping:
        c.expect(SWALLOW, len(commands))
    else:
        c.replies.rewrite(len(commands), fn)


def proxied_view(c: Core, cmd: Command, argv: list[bytes]) -> None:
    """CLIENT LIST, CLIENT INFO, CLUSTER SHARDS: their replies are rewritten (refused inside MULTI,
    where the reply would come inside EXEC's, out of sight)."""
    if c.state.in_multi:
        c.reject(cmd, b"-ERR redisguard: %s inside MULTI is not supported\r\n"
                 % cmd.name.upper().replace("|", " ").encode(), "unsupported")  # fmt: skip
        return
    if cmd.name == "cluster|shards":
        _forward_rewritten(c, [argv], cluster_shards)
        return
    peers, me, user, info = c.peers, c.state, c.state.user.name.encode(), cmd.name == "client|info"
    _forward_rewritten(c, [argv], lambda f: _string_reply(f[0], lambda b: client_rows(b, peers, me, user, info)))


def client_kill(c: Core, cmd: Command, argv: list[bytes]) -> None:
    me = c.state
    if me.in_multi:
        c.reject(cmd, b"-ERR redisguard: CLIENT KILL inside MULTI is not supported\r\n", "unsupported")
        return
    if len(argv) == 3:  # the old form, CLIENT KILL addr: any client with that address, itself too
        targets = _proxied(c, lambda s: s.addrs[0] == argv[2])
        if not targets:
            c.reply(NO_SUCH_CLIENT)
            return
        kills = [[*_KILL, b"ADDR", s.upstream_addr, b"SKIPME", b"no"] for s in targets]
        _forward_rewritten(c, kills, lambda f: b"+OK\r\n" if _killed(f) else NO_SUCH_CLIENT)
        return
    probe, judged, chosen, unknown = [*_KILL], [], {}, b""
    for i in range(2, len(argv) - 1, 2):
        opt, value = argv[i].lower(), argv[i + 1]
        if opt == b"user" and value.decode("utf-8", "replace") not in c.policy.users:
            unknown = value  # Redis stops here: the filters before it may still be wrong first
            break
        if opt in (b"user", b"addr", b"laddr", b"skipme"):
            chosen[opt] = value  # (the last one counts, as in Redis)
        if opt in (b"id", b"type"):
            judged += [argv[i], value]
        # (a known user: a filter as valid, so the probe keeps its length and Redis its reading)
        probe += [argv[i], NOWHERE] if opt in (b"addr", b"laddr") else [b"SKIPME", b"yes"] if opt == b"user" \
            else [argv[i], value]  # fmt: skip
    if len(argv) % 2 and not unknown:
        probe.append(argv[-1])  # a filter without its value: Redis's syntax error, in its order
    else:
        probe += [b"ADDR", NOWHERE]  # matches no connection: only Redis's verdict on the filters
    skipme = chosen.get(b"skipme", b"yes").lower()
    user, addr, laddr = chosen.get(b"user"), chosen.get(b"addr"), chosen.get(b"laddr")
    # Kills go out with the probe, before its verdict: only filters whose errors the kills repeat
    # (ID, TYPE: judged by Redis in each) may leave a mistake to Redis; any other means no kill.
    pairs = [(a.lower(), v.lower()) for a, v in zip(argv[2::2], argv[3::2], strict=False)]
    valid = not unknown and not len(argv) % 2 and all(
        a in (b"id", b"type", b"user", b"addr", b"laddr") or a == b"skipme" and v in (b"yes", b"no") for a, v in pairs)
    skip = skipme != b"no"
    targets = [] if not valid else _proxied(c, lambda s: (
        (user is None or s.user.name.encode() == user) and (addr is None or s.addrs[0] == addr)
        and (laddr is None or s.addrs[1] == laddr) and not (skip and s is me)))  # fmt: skip
    kills = [[*_KILL, *judged, b"ADDR", s.upstream_addr, b"SKIPME", b"no"] for s in targets]

    def answer(frames: list[bytes]) -> bytes:
        if frames[0].startswith(b"-"):
            return frames[0]
        if unknown:
            return error_format(b"No such user '%s'" % cstr(unknown))
        return b":%d\r\n" % _killed(frames[1:])

    _forward_rewritten(c, [probe, *kills], answer)


def _proxied(c: Core, match: Callable[[ClientState], bool]) -> list[ClientState]:
    """This process's proxied clients that ``match``, the caller itself last (its kill closes it)."""
    found = [s for s in list(c.peers.values()) if match(s)]
    return sorted(found, key=lambda s: s is c.state)


def _killed(frames: list[bytes]) -> int:
    return sum(int(f[1:-2]) for f in frames if f.startswith(b":"))
