# The compiled kernel's API (_speedups.c): the same as _pure.py's.
MAX_NESTING: int
RELEASE_GIL_BYTES: int

def stringmatchlen(pattern: bytes, string: bytes, nocase: bool = False) -> bool: ...
