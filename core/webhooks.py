"""The webhook contract of bulk jobs, shared by the API (which takes a callback URL) and the jobs
worker (which delivers to it): which addresses may be called, how a delivery is signed, and the
Redis record of a webhook waiting for its job to end.

Server-side request forgery: a callback URL would let anyone who can submit a job make the service
POST to its own network (Redis, cloud metadata at 169.254.169.254, an admin port). So only public
addresses are called, plus the networks an operator allows; a literal address is checked when the
job is submitted, and every address a name resolves to at each delivery (a name may resolve to
another address by then: DNS rebinding).

Signature: `X-Sentiment-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>." + body)>`,
as Stripe signs: the timestamp inside the MAC lets receivers refuse replays of old deliveries.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Sequence
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address
from urllib.parse import urlsplit

from redis import Redis
from redis.client import Pipeline

from core.protocol import Keys

SIGNATURE_HEADER = "X-Sentiment-Signature"
DELIVERY_HEADER = "X-Sentiment-Delivery"  # one id per webhook, the same on every try: receivers deduplicate by it
MAX_URL_CHARS = 2048

Address = IPv4Address | IPv6Address
Network = IPv4Network | IPv6Network


def refusal(address: Address, allowed: Sequence[Network]) -> str | None:
    """Why a webhook may not go to `address`; None when it may: a public address, or one in `allowed`."""
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # ::ffff:10.0.0.1 is 10.0.0.1
    if any(address in network for network in allowed) or (address.is_global and not address.is_multicast):
        return None
    kind = (
        "loopback"
        if address.is_loopback
        else "link-local"
        if address.is_link_local
        else "private"
        if address.is_private
        else "reserved"
    )
    return f"{address} is a {kind} address: webhooks go to public addresses, or to SENTIMENT_WEBHOOK_ALLOWED_NETWORKS"


def check_url(url: str, allowed: Sequence[Network]) -> None:
    """ValueError saying why `url` may not be a callback: not http(s), credentials in it, no host, or
    an address `refusal` refuses. A host name passes here: its addresses are checked at each delivery."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ValueError("a callback URL is http:// or https://")
    if parts.username is not None or parts.password is not None:
        raise ValueError("a callback URL holds no credentials (user:password@): the signature authenticates")
    if not parts.hostname:
        raise ValueError("a callback URL names a host")
    try:
        parts.port  # noqa: B018 (parsing it is the check)
    except ValueError:
        raise ValueError("a callback URL's port is a number from 0 to 65535") from None
    try:
        address = ip_address(parts.hostname)
    except ValueError:
        return
    if why := refusal(address, allowed):
        raise ValueError(why)


def sign(secret: bytes, body: bytes, at: int) -> str:
    """The `X-Sentiment-Signature` of `body` sent at unix time `at`."""
    mac = hmac.new(secret, f"{at}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={at},v1={mac}"


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
