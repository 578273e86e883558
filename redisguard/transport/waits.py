"""What a paused session waits for, carried out for its connection: a decision off the loop (``Offload``),
a throttle delay (``Sleep``), a change of users put in force everywhere (``ChangeUsers``), or an upstream
reply. A part that :class:`~redisguard.transport.connection.ClientProtocol` holds, with its own state;
the connection's reading stays paused ("session") for as long as a wait runs."""

from __future__ import annotations

import asyncio
import sys
from typing import Any, Protocol

from redisguard.observe.audit import get_logger
from redisguard.session.effects import ChangeUsers, Effect, Offload, Sleep, apply_users_change
from redisguard.transport.edges import Connection

log = get_logger("redisguard")

# A decision off the loop (RequestPipeline._offloads) runs Python in the decide thread between the
# matcher's GIL-free stretches. CPython makes a thread that wants the GIL wait this long before it
# asks for it back: its default, 5 ms, would add up to 5 ms to the event loop's every turn while a
# costly request is decided. 0.5 ms keeps the loop's share; the thread switches cost ~µs.
DECIDE_SWITCH_INTERVAL = 0.0005
sys.setswitchinterval(min(sys.getswitchinterval(), DECIDE_SWITCH_INTERVAL))


class Waiter(Connection, Protocol):
    """What the waits see of their connection (connection.py's ClientProtocol): the endings' view, and
    its reading and the session's next run."""

    def pause_reading(self, why: str = ...) -> None: ...
    def resume_reading(self, why: str = ...) -> None: ...
    def after_session(self) -> None: ...


class Waits:
    """The one wait of a paused session at a time: started by :meth:`start`, ended by its outcome being
    handed to the session (then the connection reads and runs the session again)."""

    __slots__ = ("acl_change", "conn", "waiting", "wake")

    def __init__(self, conn: Waiter) -> None:
        self.conn = conn
        self.waiting = False  # the session is paused: a throttle timer or an offloaded decision runs
        self.acl_change: asyncio.Future[bytes] | None = None  # the session's ChangeUsers being put in force
        self.wake: asyncio.TimerHandle | None = None

    def start(self, effect: Effect | None) -> None:
        """The session paused: stop reading and carry out what it waits for (session/effects.py)."""
        conn = self.conn
        self.waiting = True
        conn.pause_reading("session")
        loop = asyncio.get_running_loop()
        if isinstance(effect, Offload):
            job = loop.run_in_executor(conn.ctx.executor, conn.session.decide_offloaded, effect.argv)
            job.add_done_callback(self._offload_done)
        elif isinstance(effect, Sleep):
            self.wake = loop.call_later(effect.seconds, self.resume)
        elif isinstance(effect, ChangeUsers):  # the reply once the change is in force everywhere
            sequencer = conn.ctx.shared.sequencer
            if sequencer is None:  # (a process without a reloader: in force here, at once)
                self._acknowledge(apply_users_change(conn.ctx.shared, effect)[0])
                return
            answer = sequencer.submit(effect.command, effect.args, effect.computed)
            if isinstance(answer, bytes):
                self._acknowledge(answer)
                return
            task = asyncio.ensure_future(answer)
            self.acl_change = task  # (held: a task nobody references may be collected before it is done)
            task.add_done_callback(self._awaited)
        # else (None): held until an upstream reply (an EXEC's outcome): held_for_upstream() says when

    def held_for_upstream(self) -> bool:
        """Redis's bytes were handled: True if the session waited for them and may go on now (resume())."""
        s = self.conn.session
        return self.waiting and self.wake is None and not s.paused and s.effect is None and not self.conn.closed

    def resume(self) -> None:
        """The wait is over without an outcome to hand over (a delay, an upstream reply): go on."""
        self.wake = None
        self.waiting = False
        conn = self.conn
        if conn.closed:
            return
        conn.resume_reading("session")
        conn.session.resume()
        conn.after_session()

    def stop(self) -> None:
        """The connection is gone: a delay's timer with it (a job off the loop finds it closed)."""
        if self.wake is not None:
            self.wake.cancel()

    def _offload_done(self, job: asyncio.Future[Any]) -> None:
        if self._settled(job, "deciding a large request failed"):
            self.conn.session.offloaded(*job.result())
            self.conn.after_session()

    def _awaited(self, task: asyncio.Future[bytes]) -> None:
        self.acl_change = None
        if self._settled(task, "applying an ACL change failed"):
            self.conn.session.acknowledged(task.result())
            self.conn.after_session()

    def _acknowledge(self, reply: bytes) -> None:
        """The ACL change is in force at once (no wait): the session answers it and goes on."""
        self.waiting = False
        self.conn.resume_reading("session")
        self.conn.session.acknowledged(reply)
        self.conn.after_session()

    def _settled(self, job: asyncio.Future[Any], failure: str) -> bool:
        """A wait off the loop ended: True if it succeeded and the connection goes on (read again)."""
        self.waiting = False
        if self.conn.closed or job.cancelled():
            return False
        if job.exception() is not None:
            log.error("internal_error", message=failure, error=repr(job.exception()))
            self.conn.close()
            return False
        self.conn.resume_reading("session")
        return True
