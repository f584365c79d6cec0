"""The webhook contract of bulk jobs, shared by the API (which takes a callback URL) and the jobs
worker (which delivers to it): which addresses may be called, how a delivery is signed, and the
Redis record of a webhook waiting for its job to end.

Server-side request forgery: a callback URL would let anyone who can submit a job make the service
POST to its own network (Redis, cloud metadata at 169.254.169.254, an admin port). So only global
unicast addresses are called, plus the networks an operator allows. An IPv6 address that carries
IPv4 ones (IPv4-mapped or -compatible, 6to4, Teredo, NAT64) is judged by the IPv4 addresses it
carries: the hosts its packets end up at. A literal address, in any form the resolver reads as one
(`0x7f000001`, `2130706433`, `0177.0.0.1` and `127.1` are 127.0.0.1), is checked when the job is
submitted, and every address a name resolves to at each delivery (a name may resolve to another
address by then: DNS rebinding).

Signature: Standard Webhooks (https://www.standardwebhooks.com/), so receivers verify with its
libraries: `webhook-id` (the delivery id, the same on every try), `webhook-timestamp` (unix seconds)
and `webhook-signature`, `v1,<base64 HMAC-SHA256(key, "<id>.<timestamp>.<body>")>` for each secret,
space-separated: with the old and the new secret both listed, a receiver holding either verifies,
so secrets rotate without a gap. The id and the timestamp inside the MAC let receivers refuse a
replayed delivery (an old timestamp) and deduplicate retries (the id).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import socket
import time
from collections.abc import Sequence
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from urllib.parse import urlsplit

from redis import Redis
from redis.client import Pipeline

from core.protocol import Keys

ID_HEADER = "webhook-id"  # one id per webhook, the same on every try: receivers deduplicate by it
TIMESTAMP_HEADER = "webhook-timestamp"
SIGNATURE_HEADER = "webhook-signature"
SECRET_PREFIX = "whsec_"
KEY_BYTES = range(24, 65)  # the specification's bounds: 192 to 512 bits
MAX_URL_CHARS = 2048

Address = IPv4Address | IPv6Address
Network = IPv4Network | IPv6Network

NAT64 = ip_network("64:ff9b::/96")
IPV4_COMPATIBLE = ip_network("::/96")
# Not global unicast, named so a refusal says what they are; the `ipaddress` tables of Python 3.11
# call all but the first global.
NOT_PUBLIC: dict[Network, str] = {
    ip_network("100.64.0.0/10"): "shared (carrier-grade NAT)",
    ip_network("192.0.0.0/24"): "IETF protocol assignment",
    ip_network("192.88.99.0/24"): "6to4 relay anycast",
    ip_network("64:ff9b:1::/48"): "local-use NAT64",  # its IPv4 may sit anywhere in it: refused whole
    ip_network("fec0::/10"): "site-local",
    ip_network("3fff::/20"): "documentation",
}
URL_FORBIDDEN = re.compile(r"[\x00-\x20\x7f]")  # what an HTTP request line cannot carry
MAX_NAME_CHARS = 253  # DNS's longest name, without the trailing dot


def secret_key(secret: str) -> bytes:
    """The HMAC key of a Standard Webhooks secret (`whsec_` + base64 of 24 to 64 bytes); ValueError,
    never quoting the secret, for anything else."""
    if not secret.startswith(SECRET_PREFIX):
        raise ValueError(f"it does not start with {SECRET_PREFIX} (the Standard Webhooks form)")
    encoded = secret.removeprefix(SECRET_PREFIX)
    try:
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except binascii.Error:
        raise ValueError(f"it is not {SECRET_PREFIX} then base64 (A-Z a-z 0-9 + /)") from None
    if len(key) not in KEY_BYTES:
        raise ValueError(f"it holds {len(key)} bytes, not {KEY_BYTES.start} to {KEY_BYTES.stop - 1}")
    return key


def signed_headers(keys: Sequence[bytes], delivery: str, body: bytes, at: int) -> dict[str, str]:
    """The Standard Webhooks headers of `body` sent at unix time `at` as delivery `delivery`, signed
    with every key."""
    signed = f"{delivery}.{at}.".encode() + body
    macs = (base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode() for key in keys)
    return {ID_HEADER: delivery, TIMESTAMP_HEADER: str(at), SIGNATURE_HEADER: " ".join(f"v1,{mac}" for mac in macs)}


def carried_ipv4(address: IPv6Address) -> list[tuple[str, IPv4Address]]:
    """The IPv4 addresses `address` carries, each with how; empty when it carries none."""
    if address.ipv4_mapped is not None:
        return [("IPv4-mapped", address.ipv4_mapped)]
    if address.sixtofour is not None:
        return [("6to4", address.sixtofour)]
    if address.teredo is not None:
        server, client = address.teredo
        return [("Teredo server", server), ("Teredo client", client)]
    if address in NAT64:
        return [("NAT64", IPv4Address(int(address) & 0xFFFF_FFFF))]
    if address in IPV4_COMPATIBLE and int(address) > 1:  # (:: and ::1 are themselves)
        return [("IPv4-compatible", IPv4Address(int(address)))]
    return []


def not_public(address: Address) -> str | None:
    """What kind of address `address` is when it is not global unicast; None when it is."""
    named = next((kind for network, kind in NOT_PUBLIC.items() if address in network), None)
    if named is not None:
        return named
    if address.is_global and not address.is_multicast and not address.is_reserved:
        return None
    kinds = {
        "unspecified": address.is_unspecified,
        "loopback": address.is_loopback,
        "link-local": address.is_link_local,
        "multicast": address.is_multicast,
        "reserved": address.is_reserved,
        "private": address.is_private,
    }
    return next((kind for kind, is_kind in kinds.items() if is_kind), "non-global")


def refusal(address: Address, allowed: Sequence[Network], host: str | None = None) -> str | None:
    """Why a webhook may not go to `address` (which `host`, a name or spelling of it, led to); None
    when it may: global unicast, or in `allowed`.

    An address carrying IPv4 ones is judged by those alone, against `allowed` too: where 10.0.0.0/8 is
    allowed, `::ffff:10.1.2.3` and `64:ff9b::a01:203` pass, and allowing an IPv6 network (say
    2000::/3) never opens the IPv4 hosts its 6to4 or Teredo addresses lead to (2002:a9fe:a9fe:: is
    169.254.169.254)."""
    carried: list[tuple[str, Address]] = [*carried_ipv4(address)] if isinstance(address, IPv6Address) else []
    for how, reached in carried or [("", address)]:
        if any(reached in network for network in allowed) or (kind := not_public(reached)) is None:
            continue
        path = [host] if host is not None and not _spells(host, address) else []
        path += [str(address), f"{reached} ({how})"] if how else [str(address)]
        what = f"{'an' if kind[0] in 'aeiouAEIOU' else 'a'} {kind} address"
        led = f"{path[0]} is {what}" if len(path) == 1 else f"{path[0]} leads to {', then '.join(path[1:])}, {what}"
        return f"{led}: webhooks go to public addresses, or to SENTIMENT_WEBHOOK_ALLOWED_NETWORKS"
    return None


def _spells(host: str, address: Address) -> bool:
    """Whether `host` is `address` in standard notation (then the reason names the address alone)."""
    try:
        return ip_address(host) == address
    except ValueError:
        return False


def literal_address(host: str) -> Address | None:
    """The address `host` spells, in any form the resolver also reads as one (`socket.inet_aton`'s
    `0x7f000001`, `2130706433`, `0177.0.0.1`, `127.1`); None for a name."""
    try:
        return ip_address(host)
    except ValueError:
        pass
    try:
        return IPv4Address(socket.inet_aton(host))
    except (OSError, ValueError):
        return None


def name_refusal(host: str) -> str | None:
    """Why the resolver cannot take the ASCII host `host`; None when it can. getaddrinfo and TLS's SNI
    encode a name with Python's IDNA codec, which refuses an empty label and one over 63 characters."""
    try:
        host.encode("idna")
    except UnicodeError:
        return "a callback URL's host name has no empty label (a..b) and none over 63 characters"
    if len(host.removesuffix(".")) > MAX_NAME_CHARS:
        return f"a callback URL's host name is at most {MAX_NAME_CHARS} characters"
    return None


def check_url(url: str, allowed: Sequence[Network]) -> None:
    """ValueError saying why `url` may not be a callback: not http(s), credentials or spaces in it, no
    host, not an ASCII one or one the resolver cannot take, a path or query not ASCII, or an address
    `refusal` refuses. A name passes here: its addresses are checked at each delivery."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ValueError("a callback URL is http:// or https://")
    if URL_FORBIDDEN.search(url):
        raise ValueError("a callback URL holds no spaces or control characters")
    if parts.username is not None or parts.password is not None:
        raise ValueError("a callback URL holds no credentials (user:password@): the signature authenticates")
    if not parts.hostname:
        raise ValueError("a callback URL names a host")
    if not parts.hostname.isascii():
        raise ValueError("a callback URL's host is ASCII (an international name in its xn-- form)")
    if not (parts.path + parts.query).isascii():  # an HTTP request line is ASCII: it could never be sent
        raise ValueError("a callback URL's path and query are ASCII (the rest percent-encoded: é is %C3%A9)")
    if why := name_refusal(parts.hostname):
        raise ValueError(why)
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:  # (urlsplit takes 0, which nothing can connect to)
        raise ValueError("a callback URL's port is a number from 1 to 65535")
    address = literal_address(parts.hostname)
    if address is not None and (why := refusal(address, allowed, parts.hostname)):
        raise ValueError(why)


def watch(pipe: Pipeline, keys: Keys, job_id: str, url: str, look_at: float) -> None:
    """Record a webhook for a job being created in `pipe`; the jobs workers look at it from `look_at`."""
    pipe.hset(keys.webhook(job_id), "url", url)
    pipe.zadd(keys.webhooks, {job_id: look_at})


def look_now(redis: Redis | Pipeline, keys: Keys, job_id: str) -> None:
    """The job just ended: its webhook (if it has one) is due at once, not at its next periodic look."""
    redis.zadd(keys.webhooks, {job_id: time.time()}, xx=True)


def forget(pipe: Pipeline, keys: Keys, job_id: str) -> None:
    """Drop a job's webhook, delivered or not (the job is deleted: so is what it would have sent)."""
    pipe.delete(keys.webhook(job_id))
    pipe.zrem(keys.webhooks, job_id)
