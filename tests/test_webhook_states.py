"""Webhooks between jobs workers, as a state machine (Hypothesis's stateful testing) over the real
`batcher.webhooks.Sender` (two of them, as two jobs workers run) and `api.job_store.JobStore` (jobs
created with a callback URL, canceled, deleted), on fakeredis. Jobs end `finished` or `failed` as the
jobs worker ends them, and an ended job's hash may be evicted (it is cache; its webhook is state).

Senders tick; each delivery (`post`, faked) succeeds, fails or times out, and while it is on its
way the other sender ticks, the job is deleted, or the claim lapses (a delivery longer than
`CLAIM_S`) and the other sender ticks. The clock (Redis's too) moves. After every step:

- one webhook is never on its way twice at once, but after its claim lapsed (at least once, as
  docs/jobs.md says: receivers deduplicate by `webhook-id`), each try under the same delivery id;
- a delivered webhook is not sent again (but after a lapsed claim), nor one whose job was deleted;
- its record counts the failed tries; once they reach `SENTIMENT_WEBHOOK_ATTEMPTS` it is on the
  dead-letter list, with that count, and sent no more;
- no webhook vanishes: one of a job not deleted is delivered, still kept, or dead-lettered.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from types import SimpleNamespace
from unittest import mock

import fakeredis
from fakeredis._socket import _base as fakeredis_socket
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, rule

from api import job_store as job_store_module
from api.job_store import JobStore
from batcher import webhooks as webhooks_module
from batcher.webhook_http import Undelivered
from batcher.webhooks import CLAIM_S, Sender
from core import webhooks as core_webhooks
from core.protocol import Keys
from core.settings import Settings
from tests.conftest import examples

ATTEMPTS = 3
ENDED = (b"finished", b"failed", b"canceled")
SETTINGS = Settings(
    key_prefix="hooks",
    webhook_secrets="whsec_" + "QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUE=",
    webhook_attempts=ATTEMPTS,
    webhook_backoff_s=1.0,
    heartbeat_ttl_s=5,
    job_ttl_s=600,
)
KEYS = Keys(SETTINGS.key_prefix)
URL = "https://receiver.example/hook"
MEANWHILE = ["nothing", "the other sender ticks", "the job is deleted", "the claim lapses"]


class WebhookMachine(RuleBasedStateMachine):
    jobs = Bundle("jobs")

    def __init__(self) -> None:
        super().__init__()
        self.now = 1_000_000.0
        clock = SimpleNamespace(time=lambda: self.now, sleep=time.sleep)
        self._patches = [
            mock.patch.object(fakeredis_socket, "time", clock),
            mock.patch.object(webhooks_module, "time", clock),
            mock.patch.object(core_webhooks, "time", clock),
            mock.patch.object(job_store_module, "time", clock),
            mock.patch.object(webhooks_module, "post", self._post),
        ]
        for patch in self._patches:
            patch.start()
        self.redis = fakeredis.FakeRedis()
        self.store = JobStore(self.redis, SETTINGS)
        self.senders = [Sender(SETTINGS, self.redis, clock=lambda: self.now) for _ in range(2)]
        self.outcome, self.meanwhile, self.ticking = "ok", "nothing", 0
        self.on_its_way: Counter[str] = Counter()  # job -> deliveries under way
        self.lapsed: set[str] = set()  # jobs a delivery of which outlived its claim
        self.delivered: set[str] = set()
        self.deleted: set[str] = set()
        self.submitted: set[str] = set()
        self.evicted: set[str] = set()  # ended jobs whose hash Redis evicted
        self.failed: Counter[str] = Counter()  # job -> failed tries
        self.delivery_ids: dict[str, str] = {}
        self.wrong: list[str] = []  # what `post` saw that it should not have

    def teardown(self) -> None:
        for patch in reversed(self._patches):
            patch.stop()

    # --- jobs, as the API and the jobs worker make them ----------------------------------------------

    @rule(target=jobs)
    def submit(self) -> str:
        job_id = self.store.create(["a text"], URL)
        self.submitted.add(job_id)
        return job_id

    @rule(job_id=jobs)
    def delete(self, job_id: str) -> None:
        """DELETE /jobs/{id}: a running job is canceled (it ended: its webhook is due at once), an
        ended one deleted with its webhook."""
        if job_id in self.deleted | self.evicted:
            return
        status = self.redis.hget(f"rq:job:{job_id}", "status")
        self.store.delete(job_id)
        if status in ENDED:
            self.deleted.add(job_id)

    @rule(job_id=jobs, outcome=st.sampled_from(["finished", "failed"]))
    def the_job_ends(self, job_id: str, outcome: str) -> None:
        """The jobs worker ends a job that has not ended (`batcher.jobs`): its status, and its webhook due at once."""
        if self.redis.hget(f"rq:job:{job_id}", "status") in (b"queued", b"started"):
            with self.redis.pipeline() as pipe:
                pipe.hset(f"rq:job:{job_id}", "status", outcome)
                core_webhooks.look_now(pipe, KEYS, job_id)
                pipe.execute()

    @rule(job_id=jobs)
    def an_ended_job_is_evicted(self, job_id: str) -> None:
        """Redis at its maxmemory evicts an ended job's hash (it has an expiry: cache)."""
        if self.redis.hget(f"rq:job:{job_id}", "status") in ENDED:
            self.redis.delete(f"rq:job:{job_id}")
            self.evicted.add(job_id)

    @rule(seconds=st.sampled_from([0.3, 2.0, 6.0]))
    def time_passes(self, seconds: float) -> None:
        self.now += seconds

    # --- the senders -------------------------------------------------------------------------------

    @rule(
        sender=st.integers(0, 1),
        outcome=st.sampled_from(["ok", "not 2xx", "timeout"]),
        meanwhile=st.sampled_from(MEANWHILE),
    )
    def tick(self, sender: int, outcome: str, meanwhile: str) -> None:
        """A sender's look at what is due; each of its deliveries ends in `outcome`, and `meanwhile`
        happens while it is on its way."""
        self.outcome, self.meanwhile, self.ticking = outcome, meanwhile, sender
        self.senders[sender].tick()

    def _post(self, url: str, body: bytes, headers: dict[str, str], *_: object) -> None:
        job_id = json.loads(body)["job_id"]
        delivery = headers[core_webhooks.ID_HEADER]
        # (Noted, not raised: the sender takes whatever `post` raises for a failed try.)
        wrong = {
            f"a webhook of deleted job {job_id} sent": job_id in self.deleted,
            f"{job_id}'s webhook sent again": job_id in self.delivered and job_id not in self.lapsed,
            f"{job_id}'s webhook sent twice at once": self.on_its_way[job_id] > 0 and job_id not in self.lapsed,
            f"{job_id}'s webhook under another delivery id": self.delivery_ids.setdefault(job_id, delivery) != delivery,
        }
        self.wrong += [what for what, happened in wrong.items() if happened]
        outcome, meanwhile = self.outcome, self.meanwhile
        self.on_its_way[job_id] += 1
        try:
            self._meanwhile(job_id, meanwhile)
        finally:
            self.on_its_way[job_id] -= 1
        if outcome == "not 2xx":
            self.failed[job_id] += 1
            raise Undelivered("HTTP 500")
        if outcome == "timeout":
            self.failed[job_id] += 1
            raise TimeoutError("timed out")
        self.delivered.add(job_id)

    def _meanwhile(self, job_id: str, meanwhile: str) -> None:
        self.outcome, self.meanwhile = "ok", "nothing"  # (the other sender's deliveries)
        other: Callable[[], None] = self.senders[1 - self.ticking].tick
        if meanwhile == "the other sender ticks":
            other()
        elif meanwhile == "the job is deleted":
            self.delete(job_id)
            self.delete(job_id)
        elif meanwhile == "the claim lapses":
            self.now += CLAIM_S + 1
            self.lapsed.add(job_id)
            other()

    # --- what it promises ----------------------------------------------------------------------------

    @invariant()
    def each_delivery_was_one_to_make(self) -> None:
        assert not self.wrong, self.wrong

    @invariant()
    def no_webhook_vanishes(self) -> None:
        letters = {json.loads(raw)["job_id"] for raw in self.redis.lrange(KEYS.webhook_dead_letters, 0, -1)}
        for job_id in self.submitted - self.deleted - self.delivered - letters:
            assert self.redis.exists(KEYS.webhook(job_id)), f"{job_id}'s webhook vanished"

    @invariant()
    def failed_tries_are_counted_then_dead_lettered(self) -> None:
        letters = {(e := json.loads(raw))["job_id"]: e for raw in self.redis.lrange(KEYS.webhook_dead_letters, 0, -1)}
        for job_id, failures in self.failed.items():
            if job_id in self.lapsed | self.deleted | self.delivered:
                continue
            record = self.redis.hgetall(KEYS.webhook(job_id))
            if failures < ATTEMPTS:
                assert int(record.get(b"attempts", b"0")) == failures, (job_id, record, failures)
                assert job_id not in letters
            else:
                assert failures == ATTEMPTS, f"{job_id} tried {failures} times"
                assert not record and letters[job_id]["attempts"] == ATTEMPTS, (job_id, record, letters)


WebhookMachine.TestCase.settings = settings(
    max_examples=examples(250), stateful_step_count=50, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
test_a_webhook_is_sent_by_one_sender_at_a_time_counted_and_dead_lettered = WebhookMachine.TestCase
