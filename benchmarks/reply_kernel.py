"""Cost of counting reply frames, in ns per chunk: `python benchmarks/reply_kernel.py [iterations]`.

What the reply queue (session/replies.py) asks the kernel for every chunk Redis sends: ``whole_frames``
(the common case: only relayed replies owed, RESP2, whole replies) and ``ReplyScanner.scan`` (every
other case: refusals waiting, RESP3, pub/sub), each twin, on typical chunks. In process, no sockets; the
best of five runs."""

from __future__ import annotations

import sys
import timeit
from collections.abc import Callable
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from redisguard.fast import _pure, _speedups  # noqa: E402

CHUNKS = {
    "50 GET replies (32-byte values)": (b"$32\r\n" + b"v" * 32 + b"\r\n") * 50,
    "MGET of 1,000 keys (one reply)": b"*1000\r\n" + b"".join(b"$10\r\nvalue-%04d\r\n" % i for i in range(1000)),
    "50 pub/sub messages (RESP2)": (b"*3\r\n$7\r\nmessage\r\n$4\r\nnews\r\n$16\r\n" + b"p" * 16 + b"\r\n") * 50,
    "50 pub/sub messages (RESP3 push)": (b">3\r\n$7\r\nmessage\r\n$4\r\nnews\r\n$16\r\n" + b"p" * 16 + b"\r\n") * 50,
}
TWINS = {"pure": _pure, "compiled": _speedups}


def best_ns(fn: Callable[[], object], n: int) -> float:
    return min(timeit.repeat(fn, number=n, repeat=5)) / n * 1e9


def measure(n: int = 2000) -> list[tuple[str, str, dict[str, float]]]:
    """(chunk, call, {twin: ns per chunk}) for every chunk, whole_frames then scan."""
    rows = []
    for name, chunk in CHUNKS.items():
        frames = len(_pure.ReplyScanner().scan(chunk)[0])
        for call in ("whole_frames", "scan"):
            cells = {}
            for twin, mod in TWINS.items():
                if call == "whole_frames":
                    cells[twin] = best_ns(partial(mod.whole_frames, chunk, frames), n)
                else:
                    cells[twin] = best_ns(partial(mod.ReplyScanner().scan, chunk), n)
            rows.append((name, call, cells))
    return rows


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    print("| chunk | call | pure (ns) | compiled (ns) | speed-up |")
    print("|---|---|---:|---:|---:|")
    for name, call, cells in measure(n):
        print(f"| {name} | `{call}` | {cells['pure']:,.0f} | {cells['compiled']:,.0f} | "
              f"{cells['pure'] / cells['compiled']:.1f}× |")  # fmt: skip


if __name__ == "__main__":
    main()
