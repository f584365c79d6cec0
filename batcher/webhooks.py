"""Webhook delivery, a thread of the jobs worker: a job's status document, signed, POSTed to its
callback URL once the job ends, retried with backoff, then kept on the dead-letter list.

Every `DUE_WEBHOOKS_EVERY_S` the thread takes the webhooks that are due (`Keys.webhooks`, scored by when to
look next). One whose job has not ended is looked at again a heartbeat TTL later: the worker that
ends a job, and the API that cancels one, make its webhook due at once; the periodic look catches a
job that RQ's abandoned-job handling failed. Once the job has ended its document is made, once, and
kept with the webhook: every try sends the same body under the same delivery id, the job itself
gone or not. The record has no expiry, so no memory policy evicts it: it goes when delivered or
dead-lettered, or with its job deleted. A job gone before its document was made (expired, evicted:
an ended job is cache) dead-letters its webhook, saying so.

Any failure of a try is one of `SENTIMENT_WEBHOOK_ATTEMPTS`, foreseen (not 2xx, no connection, the
deadline) or not (a bug, an input nothing foresaw); a refused address ends the tries at once.

A claim key with an expiry lets one jobs worker at a time send a webhook; one that dies mid-delivery
leaves it to another when the claim lapses (at least once: receivers deduplicate by `webhook-id`).
A claim is released only while it is still this sender's (compare and delete): one that lapsed
during a slow delivery and was taken by another sender stays that sender's.

Each try is signed anew (Standard Webhooks, `core.webhooks.signed_headers`) with every configured
secret and POSTed by `batcher.webhook_http`: addresses checked, one connection, one deadline.
"""

from __future__ import annotations

import http.client
import logging
import ssl
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from urllib.parse import urlsplit

import orjson
from redis import Redis
from redis.client import Pipeline
from redis.exceptions import RedisError
from redis.typing import EncodableT, FieldT
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus

from batcher.webhook_http import DEADLINE_S, AddressRefused, Undelivered, post
from core import webhooks
from core.job_spec import ENDED, JOB_STATUS, SERIALIZER, status_document
from core.protocol import Keys, new_id
from core.redis_errors import Backoff, describe
from core.redis_replies import raw, text
from core.settings import Settings
from core.webhooks import secret_key, signed_headers

log = logging.getLogger(__name__)

DUE_WEBHOOKS_EVERY_S = 0.25  # how often due webhooks are looked for
CLAIM_S = int(6 * DEADLINE_S)  # a delivery (its deadline) and the Redis writes around it, many times over
HEADERS = {"Content-Type": "application/json", "User-Agent": "sentiment-batcher-webhooks"}
DUE_PER_LOOK = 16
DEAD_LETTERS_KEPT = 10_000  # the newest; older ones are dropped
ERROR_CHARS = 200
UNSENT_SAID_EVERY_S = 60.0  # how often a jobs worker without secrets says that webhooks wait (`Unsent`)


class Sender:
    """Delivers the webhooks that are due, on each `tick` (run every `DUE_WEBHOOKS_EVERY_S` by a `Periodic` thread)."""

    def __init__(
        self,
        settings: Settings,
        redis: Redis,
        tls: ssl.SSLContext | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not settings.webhook_secrets:
            raise ValueError("webhooks need SENTIMENT_WEBHOOK_SECRETS")
        self.redis = redis
        self.keys = Keys(settings.key_prefix)
        self.signing_keys = [secret_key(secret.get_secret_value()) for secret in settings.webhook_secrets]
        self.allowed = settings.webhook_allowed_networks
        self.attempts = settings.webhook_attempts
        self.backoff_s = settings.webhook_backoff_s
        self.look_s = settings.heartbeat_ttl_s
        self.tls = tls or ssl.create_default_context()  # the system's CAs, host names checked
        self.name = new_id()
        self.clock = clock  # monotonic seconds
        self.backoff = Backoff(log)
        self._resume_at = float("-inf")  # after a Redis failure, no look before this (`clock`)

    def tick(self) -> None:
        """Deliver the webhooks that are due and that no other jobs worker is delivering. After a Redis
        failure the next look waits out a backoff (each tick would meet the outage, and log it)."""
        if self.clock() < self._resume_at:
            return
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
                    except Exception:  # a record it cannot read (mangled): it never will, nor the thread end
                        log.exception("webhook of job %s unreadable: dead-lettered", job_id)
                        self._finish(job_id, dead_letter_entry(job_id, None, 0, "its record is unreadable"))
                    finally:
                        self._release(claim)
        except RedisError as exc:
            delay = self.backoff.next()
            log.warning("webhooks not looked at: redis failed (%s); looking again in %.1f s", describe(exc), delay)
            self._resume_at = self.clock() + delay
        else:
            self.backoff.reset()

    def _release(self, claim: str) -> None:
        """Delete `claim` if it is still this sender's: compare and delete, in one transaction."""

        def release(pipe: Pipeline) -> None:
            if raw(pipe.get(claim)) == self.name.encode():
                pipe.multi()
                pipe.delete(claim)

        self.redis.transaction(release, claim)

    def _handle(self, job_id: str) -> None:
        record = {text(field): raw(value) for field, value in self.redis.hgetall(self.keys.webhook(job_id)).items()}
        if "url" not in record:  # dropped with its job meanwhile
            self.redis.zrem(self.keys.webhooks, job_id)
            return
        url, tries = record["url"].decode(), int(record.get("attempts", b"0")) + 1
        host = urlsplit(url).hostname
        try:
            if "body" not in record:
                if not _ended(raw(self.redis.hget(Job.key_for(job_id), "status"))):
                    self._update(job_id, {}, time.time() + self.look_s, ended=False)
                    return
                try:
                    job = Job.fetch(job_id, connection=self.redis, serializer=SERIALIZER)
                except NoSuchJobError:
                    self._give_up(job_id, host, tries - 1, "its job was gone (expired or evicted) before it went out")
                    return
                record |= {"body": orjson.dumps(status_document(job)), "delivery": new_id().encode()}
                if not self._update(job_id, {"body": record["body"], "delivery": record["delivery"]}, time.time()):
                    return
            self._deliver(url, record["body"], record["delivery"].decode())
        except RedisError:
            raise
        except AddressRefused as exc:
            self._give_up(job_id, host, tries, str(exc))
        except Exception as exc:  # any failure of a try counts as one, foreseen or not
            self._failed(job_id, host, tries, exc)
        else:
            log.info("webhook of job %s delivered to %s (try %d)", job_id, host, tries)
            self._finish(job_id)

    def _deliver(self, url: str, body: bytes, delivery: str) -> None:
        """One try: `body`, signed now, POSTed to `url` (raising as `post` does)."""
        signed = signed_headers(self.signing_keys, delivery, body, int(time.time()))
        post(url, body, HEADERS | signed, self.allowed, self.tls)

    def _failed(self, job_id: str, host: str | None, tries: int, exc: Exception) -> None:
        """A failed try: retried after its backoff, or, the tries spent, dead-lettered. A failure `post`
        foresees (not 2xx; OSError: no name, connection, TLS, a timeout; a broken answer) is logged at
        INFO; any other one at WARNING, with its traceback at the first try."""
        foreseen = isinstance(exc, Undelivered | OSError | http.client.HTTPException)
        error = ((str(exc) or type(exc).__name__) if foreseen else f"{type(exc).__name__}: {exc}")[:ERROR_CHARS]
        traceback = not foreseen and tries == 1
        if tries >= self.attempts:
            self._give_up(job_id, host, tries, error, traceback)
            return
        delay = self.backoff_s * 2 ** (tries - 1)
        level = logging.INFO if foreseen else logging.WARNING
        failure = "webhook of job %s to %s failed (%s); try %d in %.1f s"
        log.log(level, failure, job_id, host, error, tries + 1, delay, exc_info=traceback)
        self._update(job_id, {"attempts": str(tries), "error": error}, time.time() + delay)

    def _update(self, job_id: str, fields: Mapping[FieldT, EncodableT], look_at: float, ended: bool = True) -> bool:
        """Write `fields` to the webhook and look at it again at `look_at`, unless it was dropped
        meanwhile with its job (False then). A job looked at running (not `ended`) that ended since
        (WATCHed) is looked at now: its end made the webhook due at once, and a later look would undo
        that, sending it a heartbeat TTL late."""
        key, job_key = self.keys.webhook(job_id), Job.key_for(job_id)

        def write(pipe: Pipeline) -> bool:
            if not pipe.exists(key):
                return False
            look = look_at if ended or not _ended(raw(pipe.hget(job_key, "status"))) else time.time()
            pipe.multi()
            if fields:
                pipe.hset(key, mapping=fields)
            pipe.zadd(self.keys.webhooks, {job_id: look}, xx=True)
            return True

        return bool(self.redis.transaction(write, key, job_key, value_from_callable=True))  # type: ignore[arg-type]

    def _give_up(self, job_id: str, host: str | None, tries: int, error: str, traceback: bool = False) -> None:
        dead = "webhook of job %s to %s gave up after %d tries (%s): dead-lettered"
        log.warning(dead, job_id, host, tries, error, exc_info=traceback)
        self._finish(job_id, dead_letter_entry(job_id, host, tries, error))

    def _finish(self, job_id: str, dead_letter: bytes | None = None) -> None:
        with self.redis.pipeline() as pipe:
            if dead_letter is not None:
                pipe.lpush(self.keys.webhook_dead_letters, dead_letter)
                pipe.ltrim(self.keys.webhook_dead_letters, 0, DEAD_LETTERS_KEPT - 1)
            webhooks.forget(pipe, self.keys, job_id)
            pipe.execute()


class Unsent:
    """What a jobs worker without SENTIMENT_WEBHOOK_SECRETS does about webhooks (it can sign none):
    while some are overdue (an API with secrets took their callback URLs, and no jobs worker sends
    them), it says so every `UNSENT_SAID_EVERY_S` (run by a `Periodic`), rather than leave them
    unsent, and unexpiring, in silence. Overdue by that long: a jobs worker with secrets, if any, takes
    a due one within `DUE_WEBHOOKS_EVERY_S`."""

    def __init__(self, settings: Settings, redis: Redis) -> None:
        self.redis = redis
        self.keys = Keys(settings.key_prefix)

    def tick(self) -> None:
        try:
            overdue = self.redis.zcount(self.keys.webhooks, "-inf", time.time() - UNSENT_SAID_EVERY_S)
        except RedisError:
            return  # the worker's own loop says when Redis fails
        if overdue:
            log.warning(
                "%d webhooks overdue, but this jobs worker sends none: it has no SENTIMENT_WEBHOOK_SECRETS "
                "(set the API's on every jobs worker)",
                overdue,
            )


def _ended(status: bytes | None) -> bool:
    """Whether a job whose hash reads `status` has ended (or is gone: there is nothing to wait for)."""
    return status is None or JOB_STATUS.get(JobStatus(status.decode()), "queued") in ENDED


def dead_letter_entry(job_id: str, host: str | None, tries: int, error: str) -> bytes:
    """An entry of the dead-letter list: the job, where it was to go, the tries made, the last error, when."""
    return orjson.dumps({"job_id": job_id, "host": host, "attempts": tries, "error": error, "at": datetime.now(UTC)})
