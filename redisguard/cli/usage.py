"""The manual of every ``redisguard`` command, as its ``--help`` prints it: what it does, its exit
status, and one example (as redis-cli and ghostunnel show theirs). Kept apart from the argument
definitions (main.py) so that those stay short; ``tests/system/test_cli_help.py`` checks that every
command has a description, an example, and help on every option."""

from __future__ import annotations

import argparse

# by the command's prog minus "redisguard ": (what it does, in paragraphs; one example)
MANUAL: dict[str, tuple[str, str]] = {
    "": ("""\
redisguard terminates TLS in front of one Redis 7.0, enforces Redis's own ACL
language (the users.acl file Redis reads) itself, and logs every client into
Redis as one service user. Each command below has its own --help.""", """\
  redisguard certs init --dir certs && redisguard check-config -c redisguard.toml"""),
    "serve": ("""\
Loads the config, the users file and the certificates, checks the upstream
(refusing to start on a config it cannot enforce), then accepts clients.

Signals: SIGHUP re-reads the users file, every listener's certificates and the
reloadable options, all or nothing (a refused reload keeps everything in force
and says why in config_reload_failed); SIGTERM or SIGINT stop accepting, let the
clients finish for up to [server] drain_timeout, then close the rest.
Logs are JSON lines on stderr. Exit status: 0 after a drain, 2 on a config
error.""", """\
  redisguard serve -c /etc/redisguard/redisguard.toml
  kill -HUP "$(pidof -s redisguard)"     # after editing users.acl"""),
    "check-config": ("""\
Reads the config as serve would and reports every problem it finds, one line
each, naming the fix: the users file (path:line), certificates and keys, the
listeners' and the metrics port's addresses (test-bound), and with --peer the
policy digest of other sidecars. Problems go to stderr as error:/warning:/
note: lines; stdout gets one "PATH: OK" line when there is no error.
Exit status: 0 OK, 1 errors found, 2 the config cannot be read.""", """\
  redisguard check-config -c redisguard.toml && systemctl reload redisguard"""),
    "audit-upstream": ("""\
Connects to Redis as the configured upstream user, and once without AUTH as a
stranger would, and reports its hardening checklist item by item as pass, warn,
fail or unknown, each with its fix: the version, protected-mode, the 'default'
user, what the upstream user may run (ACL DRYRUN), commands left under their own
names, the persistence directory. An item reads "unknown" when the upstream user
may not look (it needs +info +config|get +acl|getuser +acl|dryrun; see
docs/security.md). Exit status: 1 on any fail, 2 if Redis cannot be reached,
else 0.""", """\
  redisguard audit-upstream -c redisguard.toml --json | jq '.checks[] | select(.status != "pass")'"""),
    "firewall": ("""\
Prints firewall rules for this config: each listener's port open only to its
allowed_sources, the upstream Redis port reachable from loopback only. Nothing
is applied: read them, then load them yourself.""", """\
  redisguard firewall -c redisguard.toml --format nftables | sudo nft -f -"""),
    "certs": ("""\
Development certificates only: the CA key is written next to the certificates
it signs. Use your own PKI (or cert-manager) in production.""", """\
  redisguard certs init --dir certs --san redis.internal"""),
    "certs init": ("""\
Writes ca.pem/ca.key, server.pem/server.key (CN localhost, SANs localhost,
127.0.0.1, ::1 and every --san) and client.pem/client.key (CN and SPIFFE ID
of --client-name), keys mode 0600, valid 365 days (the CA 730). Existing files
are kept unless --force.""", """\
  redisguard certs init --dir certs --san 10.0.0.5 --client-name billing"""),
    "acl": ("""\
Tools for the users file, offline: nothing here connects to Redis or to a
running redisguard. For ACL administration of a running proxy use redis-cli
against it (ACL SETUSER, ACL DELUSER, ACL LOAD, ACL SAVE), as with Redis.""", """\
  redisguard acl check --users users.acl --user app -- GET cache:1"""),
    "acl check": ("""\
Prints the verdict redisguard would give USER for one command (Redis's order:
unknown command, arity, then the user's commands, keys and channels), with
Redis's error text when denied. With -c, also the config's disabled and
protected commands, as the proxy decides. A user that is off is checked too,
but the answer says that it cannot log in.
Exit status: 0 allowed, 1 denied, 2 usage or users-file error.""", """\
  redisguard acl check -c redisguard.toml --user app -- SET session:42 x EX 60"""),
    "acl hash": ("""\
Reads one password on stdin (without echo on a terminal) and prints the
#<sha256> rule to put in the users file instead of >password, so the file holds
no clear password.""", """\
  printf '%s\\n' "$NEW_PASSWORD" | redisguard acl hash   # -> #5e884898..."""),
    "acl suggest": ("""\
From a traffic profile ([profile] file) recorded by a running proxy, prints for
every user the narrowest rules that still allow all the traffic seen (commands,
key and channel patterns), in the users-file format; with --users, passwords
and on/off are kept from the current file.""", """\
  redisguard acl suggest --profile /var/lib/redisguard/profile.json --users users.acl --diff"""),
    "acl diff": ("""\
Prints a unified diff of the two users files, each as ACL LIST would list its
users (so only real changes of rules show); with --against, also replays the
traffic of a profile under NEW and lists what it would deny.
Exit status: 1 if the new file would deny observed traffic.""", """\
  redisguard acl diff users.acl users.acl.new --against profile.json"""),
    "acl test": ("""\
Runs policy expectations kept next to the users file: a TOML file of [[case]]
tables (user, command, expect = "allowed" or "denied"), each printed PASS or
FAIL. Exit status: 1 on any failure (for CI).""", """\
  redisguard acl test policy-tests.toml --users users.acl"""),
    "demo": ("""\
Starts a real redis-server and redisguard on free loopback ports (dev
certificates, config/users.acl), runs a scripted session showing allowed and
denied commands and the metrics, and stops both. Needs redis-server on PATH.""", """\
  redisguard demo --dir /tmp/redisguard-demo"""),
}


def manual(p: argparse.ArgumentParser, text: str) -> None:
    """Give the (sub)command parser ``p`` its manual: ``text`` (its one-line help) as the first line,
    then :data:`MANUAL`'s paragraphs, and its example as the epilog."""
    about, example = MANUAL[p.prog.partition(" ")[2]]
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.description = f"{text[0].upper()}{text[1:]}.\n\n{about}" if text else about
    p.epilog = f"example:\n{example}"
