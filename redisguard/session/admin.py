"""ACL commands answered from redisguard's own users.

WHOAMI/USERS/LIST/GETUSER/DRYRUN from the users and the prebuilt replies; LOG of redisguard's own
denials; SETUSER/DELUSER/LOAD/SAVE on redisguard's users: the work is done off the loop (an Offload
of the pipeline), and a change is put in force by the runtime (a ChangeUsers effect), everywhere,
before it is answered. A change of rights that was acknowledged is final.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from redisguard.acl import User, admin
from redisguard.commands.table import Command
from redisguard.policy.decide import Policy, dryrun
from redisguard.protocol.resp import encode_bulk
from redisguard.session.core import Core
from redisguard.session.effects import ChangeUsers
from redisguard.session.pubsub import subscriptions_allowed
from redisguard.session.state import ClientState

# ACL subcommands answered by the proxy from its own users (ACL CAT, GENPASS, HELP go to Redis).
ACL_LOCAL = {"acl|whoami", "acl|users", "acl|list", "acl|getuser", "acl|dryrun", "acl|setuser", "acl|deluser",
             "acl|load", "acl|save", "acl|log"}  # fmt: skip
# ... of which these read or write the users file, or rebuild users: done in the worker thread.
ACL_ADMIN = {b"setuser", b"deluser", b"load", b"save"}


def compute(name: str, argv: Sequence[bytes], policy: Policy) -> tuple[Any, ...]:
    """ACL SETUSER/DELUSER/SAVE against ``policy`` (file I/O included: run off the loop)."""
    users = policy.users
    if name == "acl|setuser":
        return admin.setuser(users, policy.table, argv[2:])
    if name == "acl|deluser":
        return admin.deluser(users, argv[2:])
    reply, err = admin.acl_save(policy.users_file or None, users)
    return (reply, err)


def await_reply(c: Core, effect: ChangeUsers) -> None:
    """The reply is made elsewhere (the change being put in force everywhere): hold the later requests,
    as for a decision off the loop, until the runtime hands it to ``Session.acknowledged``."""
    c.susp.effect = effect
    c.susp.paused = True


def acl(c: Core, cmd: Command, argv: list[bytes]) -> None:
    st = c.state
    if st.in_multi and cmd.name in ACL_LOCAL:  # Redis would queue it; the answer is made here
        sub = cmd.name.split("|", 1)[1].upper()
        c.reject(cmd, b"-ERR redisguard: ACL %s inside MULTI is not supported\r\n" % sub.encode(), "unsupported")
        return
    if cmd.name == "acl|whoami":
        c.reply(encode_bulk(st.user.name))
    elif cmd.name == "acl|users":
        c.reply(c.shared.replies().acl_users())
    elif cmd.name == "acl|list":
        c.reply(c.shared.replies().acl_list())
    elif cmd.name == "acl|getuser":
        c.reply(c.shared.replies().acl_getuser(argv[2], st.resp))
    elif cmd.name == "acl|dryrun":
        decided = c.susp.decided
        if decided is not None and decided[0] is argv:
            c.reply(decided[2][0])  # made off the loop with the verdict
        else:
            c.reply(dryrun(c.policy, argv[2:]))
    elif cmd.name == "acl|log":
        c.reply(c.shared.acl_log.reply(argv[2:], st.resp, time.time(), argv[1]))
    elif cmd.name == "acl|load":
        await_reply(c, ChangeUsers("load", (), None))  # the file is read in its turn in the sequence
    elif cmd.name in ("acl|setuser", "acl|deluser", "acl|save"):
        users = c.policy.users
        done, c.susp.admin_done = c.susp.admin_done, None
        if done is None or done[0] is not users:  # not precomputed, or another client changed the users since
            done = (users, compute(cmd.name, argv, c.policy))
        result = done[1]
        if cmd.name == "acl|save" or result[0] is None:
            c.reply(result[0] if cmd.name == "acl|save" else result[1])
            return
        await_reply(c, ChangeUsers(cmd.name[4:], argv[2:], done))  # answered once in force
    else:
        c.forward(argv)


def rebind(st: ClientState, users: dict[str, User], changed: set[str] | None, deleted: Sequence[str]) -> str:
    """The users changed: move this client to its new user, or say why the client must go ("").

    ACL LOAD and SIGHUP (``changed`` None) disconnect clients whose user went or whose rules or
    passwords changed, as Redis's ACL LOAD does; after ACL SETUSER a client keeps its connection
    with the new rules, as in Redis, unless it is subscribed and its channel rules changed
    (Redis 7.0 kills such pub/sub clients); after ACL DELUSER its clients go."""
    name = st.user.name
    if changed is not None and name not in changed and name not in deleted:
        return ""
    new = users.get(name)
    if new is None:
        return "user deleted"
    if changed is None:
        if new.fingerprint != st.user.fingerprint:
            return "user changed by reload"
    elif st.subscribed and not subscriptions_allowed(st, new):
        return "channel permissions changed"
    st.user = new
    return ""
