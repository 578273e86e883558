"""Redis 7.0's ACL language: rules, users files, glob, and the per-command decision."""

from .check import Denied, check
from .glob import compile_glob, stringmatch
from .replies import ACLReplies
from .user import ACLError, Selector, User, default_user, hash_password, new_user
from .users_file import UsersFileError, load_users, missing_default_message, parse_users, render_users, save_users

__all__ = [
    "ACLError",
    "ACLReplies",
    "Denied",
    "Selector",
    "User",
    "UsersFileError",
    "check",
    "compile_glob",
    "default_user",
    "hash_password",
    "load_users",
    "missing_default_message",
    "new_user",
    "parse_users",
    "render_users",
    "save_users",
    "stringmatch",
]
