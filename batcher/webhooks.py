"""Webhook delivery, a thread of the jobs worker: a job's status document, signed, POSTed to its
callback URL once the job ends, retried with backoff, then kept on the dead-letter list.

Every `LOOK_S` the thread takes the webhooks that are due (`Keys.webhooks`, scored by when to
look next). One whose job has not ended is looked at again a heartbeat TTL later: the worker that
ends a job, and the API that cancels one, make its webhook due at once; the periodic look catches a
job that RQ's abandoned-job handling failed. Once the job has ended its document is made, once, and
kept with the webhook: every try sends the same body under the same delivery id.

A claim key with an expiry lets one jobs worker at a time send a webhook; one that dies mid-delivery
leaves it to another when the claim lapses (at least once: receivers deduplicate by delivery id).

Connections go only to addresses that passed `core.webhooks.refusal`: the host is resolved here,
every address checked, and the request sent to a checked address with the host's name in `Host` (and
in TLS's SNI and certificate check), never resolved again by the HTTP client. No proxy from the
environment, no redirect followed: either could lead elsewhere.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from ipaddress import ip_address
from urllib.parse import urlsplit

import httpx
import orjson
from redis import Redis
from redis.client import Pipeline
from redis.exceptions import RedisError
from redis.typing import EncodableT, FieldT
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus

from core import webhooks
from core.job_spec import ENDED, JOB_STATUS, SERIALIZER, status_document
from core.protocol import Keys, new_id
from core.redis_errors import describe
from core.redis_replies import raw, text
from core.settings import Settings
from core.webhooks import DELIVERY_HEADER, SIGNATURE_HEADER, Address, refusal, sign

log = logging.getLogger(__name__)
logging.getLogger("httpx").setLevel(logging.WARNING)  # it logs each URL at INFO, and a callback URL may hold a token

LOOK_S = 0.25  # how often due webhooks are looked for
TIMEOUT_S = 5.0  # to connect, and then between any two reads or writes, per address tried
CLAIM_S = 60  # well past a delivery's longest (TIMEOUT_S per address)
DUE_PER_LOOK = 16
DEAD_LETTERS_KEPT = 10_000  # the newest; older ones are dropped
ERROR_CHARS = 200


class Refused(Exception):
    """The callback's host resolves to an address webhooks may not call: not retried."""


class Undelivered(Exception):
    """The receiver answered, but not 2xx: retried."""


class Sender:
    """Delivers the webhooks that are due, on each `tick` (run every `LOOK_S` by a `Beating` thread)."""

    def __init__(self, settings: Settings, redis: Redis, client: httpx.Client | None = None) -> None:
        if settings.webhook_secret is None:
            raise ValueError("webhooks need SENTIMENT_WEBHOOK_SECRET")
        self.redis = redis
        self.keys = Keys(settings.key_prefix)
        self.secret = settings.webhook_secret.get_secret_value().encode()
        self.allowed = settings.webhook_allowed_networks
        self.attempts = settings.webhook_attempts
        self.backoff_s = settings.webhook_backoff_s
        self.look_s = settings.heartbeat_ttl_s
        self.client = client or httpx.Client(timeout=TIMEOUT_S, follow_redirects=False, trust_env=False)
        self.name = new_id()

    def tick(self) -> None:
        """Deliver the webhooks that are due and that no other jobs worker is delivering."""
        try:
            due: list[bytes] = self.redis.zrangebyscore(
                self.keys.webhooks, "-inf", time.time(), start=0, num=DUE_PER_LOOK
            )  # type: ignore[assignment]
            for job_id in map(text, due):
                claim = self.keys.webhook_claim(job_id)
                if self.redis.set(claim, self.name, nx=True, ex=CLAIM_S):
                    try:
                        self._handle(job_id)
                    except RedisError:
                        raise
                    except Exception:  # a bug or a mangled record: never the end of the thread
                        log.exception("webhook of job %s failed; looked at again in %.0f s", job_id, self.look_s)
                        self.redis.zadd(self.keys.webhooks, {job_id: time.time() + self.look_s}, xx=True)
                    finally:
                        self.redis.delete(claim)
        except RedisError as exc:  # the next look tries again
            log.warning("webhooks not looked at: redis failed (%s)", describe(exc))

    def _handle(self, job_id: str) -> None:
        record = {text(field): raw(value) for field, value in self.redis.hgetall(self.keys.webhook(job_id)).items()}
        if "url" not in record:  # dropped with its job meanwhile
            self.redis.zrem(self.keys.webhooks, job_id)
            return
        if "body" not in record:
            status = raw(self.redis.hget(Job.key_for(job_id), "status"))
            if status is not None and JOB_STATUS.get(JobStatus(status.decode()), "queued") not in ENDED:
                self._update(job_id, {}, time.time() + self.look_s)
                return
            try:
                job = Job.fetch(job_id, connection=self.redis, serializer=SERIALIZER)
            except NoSuchJobError:
                log.info("job %s expired before its webhook went out: nothing to send", job_id)
                self._finish(job_id)
                return
            record |= {"body": orjson.dumps(status_document(job)), "delivery": new_id().encode()}
            if not self._update(job_id, {"body": record["body"], "delivery": record["delivery"]}, time.time()):
                return
        self._deliver(job_id, record)

    def _deliver(self, job_id: str, record: dict[str, bytes]) -> None:
        url, tries = record["url"].decode(), int(record.get("attempts", b"0")) + 1
        host = urlsplit(url).hostname
        try:
            self._post(url, record["body"], record["delivery"].decode())
        except Refused as exc:
            self._give_up(job_id, host, tries, str(exc))
        except (Undelivered, httpx.HTTPError, OSError) as exc:  # OSError: the name did not resolve
            error = (str(exc) or type(exc).__name__)[:ERROR_CHARS]
            if tries >= self.attempts:
                self._give_up(job_id, host, tries, error)
            else:
                delay = self.backoff_s * 2 ** (tries - 1)
                log.info("webhook of job %s to %s failed (%s); try %d in %.1f s", job_id, host, error, tries + 1, delay)
                self._update(job_id, {"attempts": str(tries), "error": error}, time.time() + delay)
        else:
            log.info("webhook of job %s delivered to %s (try %d)", job_id, host, tries)
            self._finish(job_id)

    def _post(self, url: str, body: bytes, delivery: str) -> None:
        """POST `body`, signed, to a checked address of `url`'s host (the next one if it refuses the connection)."""
        try:
            target = httpx.URL(url)
        except httpx.InvalidURL as exc:  # (what `core.webhooks.check_url` lets by, httpx may not)
            raise Refused(f"not a URL to send to ({exc})") from None
        headers = {
            "Host": urlsplit(url).netloc,
            "Content-Type": "application/json",
            "User-Agent": "sentiment-batcher-webhooks",
            DELIVERY_HEADER: delivery,
            SIGNATURE_HEADER: sign(self.secret, body, int(time.time())),
        }
        tls = {"sni_hostname": target.host} if target.scheme == "https" else {}
        unreachable: httpx.ConnectError | None = None
        for address in self._addresses(target.host, target.port or (443 if tls else 80)):
            request = self.client.build_request(
                "POST", target.copy_with(host=str(address)), content=body, headers=headers, extensions=tls
            )
            try:
                answer = self.client.send(request, stream=True)  # the status is all we read: never a body
            except httpx.ConnectError as exc:
                unreachable = exc
                continue
            answer.close()
            if not answer.is_success:
                raise Undelivered(f"HTTP {answer.status_code}")
            return
        assert unreachable is not None  # (a name resolves to one address at least)
        raise unreachable

    def _addresses(self, host: str, port: int) -> list[Address]:
        """Every address `host` resolves to, each one checked: a refused one refuses the delivery."""
        try:
            addresses: list[Address] = [ip_address(host)]
        except ValueError:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            addresses = list(dict.fromkeys(ip_address(info[4][0]) for info in infos))
        for address in addresses:
            if why := refusal(address, self.allowed):
                raise Refused(why if str(address) == host else f"{host} resolves to {why}")
        return addresses

    def _update(self, job_id: str, fields: Mapping[FieldT, EncodableT], look_at: float) -> bool:
        """Write `fields` to the webhook and look at it again at `look_at`, unless it was dropped
        meanwhile with its job (False then)."""
        key = self.keys.webhook(job_id)

        def write(pipe: Pipeline) -> bool:
            if not pipe.exists(key):
                return False
            pipe.multi()
            if fields:
                pipe.hset(key, mapping=fields)
            pipe.zadd(self.keys.webhooks, {job_id: look_at}, xx=True)
            return True

        return bool(self.redis.transaction(write, key, value_from_callable=True))  # type: ignore[arg-type]

    def _give_up(self, job_id: str, host: str | None, tries: int, error: str) -> None:
        log.warning("webhook of job %s to %s gave up after %d tries (%s): dead-lettered", job_id, host, tries, error)
        entry = {"job_id": job_id, "host": host, "attempts": tries, "error": error, "at": datetime.now(UTC)}
        self._finish(job_id, orjson.dumps(entry))

    def _finish(self, job_id: str, dead_letter: bytes | None = None) -> None:
        with self.redis.pipeline() as pipe:
            if dead_letter is not None:
                pipe.lpush(self.keys.webhook_dead_letters, dead_letter)
                pipe.ltrim(self.keys.webhook_dead_letters, 0, DEAD_LETTERS_KEPT - 1)
            webhooks.forget(pipe, self.keys, job_id)
            pipe.execute()
