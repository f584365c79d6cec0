"""Redis replies as our clients receive them: bytes.

redis-py types a reply as `bytes | str` whichever `decode_responses` a client was made with; every
client here keeps the default (no decoding: results, cache entries and work items are JSON bytes),
so its replies are bytes. These say so once, for the type checker, at no cost at run time.
"""

from __future__ import annotations

from typing import cast, overload


@overload
def raw(reply: bytes | str) -> bytes: ...
@overload
def raw(reply: bytes | str | None) -> bytes | None: ...
def raw(reply: bytes | str | None) -> bytes | None:
    """One reply (a GET, GETDEL, a set member), as the bytes it is."""
    return cast("bytes | None", reply)


def raws(replies: list[bytes | str | None]) -> list[bytes | None]:
    """An MGET's replies, as the bytes (or None) they are."""
    return cast("list[bytes | None]", replies)


def text(reply: bytes | str) -> str:
    """A reply that names something (a worker id in a set), decoded; bytes that are not UTF-8 (written
    by something else) come out replaced, never as an error."""
    return raw(reply).decode(errors="replace")
