"""A request's deadline: fixed when it arrives, before its authentication, rate limit and model
lookup, and the stage it has reached, which its 504 names.

The first layer that asks fixes it (`request_deadline`): the access control when keys or a rate
limit are on, else the body limit before the upload (`api.limits`), else the route, each before
anything else. The gRPC service fixes a call's from the call's own deadline. Every wait on Redis on
a request's path is cut at it: the prediction path as a whole (`api.predictions`), the steps before
it each (`Deadline.redis_call`); so is the upload of its body (`api.limits`). A stage begun past the
deadline makes no call: its 504 says the deadline was reached there, and blames Redis only when a
call to Redis was the one outstanding.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from enum import StrEnum

from starlette.datastructures import Headers
from starlette.types import Scope

from api.errors import ErrorType, ServiceError
from api.schemas import requested_timeout


class Stage(StrEnum):
    """Where a request is on its path, in order."""

    AUTHENTICATION = "authentication"
    RATE_LIMIT = "rate limit"
    UPLOAD = "upload"  # its body arriving (`api.limits`)
    MODEL_LOOKUP = "model lookup"  # the model the workers announced
    ADMISSION = "admission"  # the fleet's load (the `deadline` overload policy)
    CACHE_LOOKUP = "cache lookup"
    QUEUE = "queue"  # its work item pushed, then waiting in the queue
    MODEL = "model"  # a worker took its work item


class Deadline:
    """`at` (unix seconds, as a work item carries it), `timeout_s` after the request arrived; `stage`
    the stage it has reached, `redis` whether a call of that stage to Redis is outstanding."""

    def __init__(self, timeout_s: float) -> None:
        self.at = time.time() + timeout_s
        self.timeout_s = timeout_s
        self.stage = Stage.AUTHENTICATION
        self.redis = False

    def left_s(self) -> float:
        return self.at - time.time()

    def loop_at(self) -> float:
        """The deadline on the running event loop's clock (`asyncio.timeout_at`'s)."""
        return asyncio.get_running_loop().time() + self.left_s()

    def enter(self, stage: Stage) -> None:
        """Go on to `stage`: the 504 at once if the deadline has passed already."""
        self.stage, self.redis = stage, False
        if self.left_s() <= 0:
            raise self.reached()

    def on_redis(self, stage: Stage) -> Deadline:
        """Enter `stage` for a `with` block that waits on Redis: `reached` says so when the deadline cuts
        it (the caller bounds the block). A class's context, not a generator's: it is on the hot path."""
        self.enter(stage)
        self.redis = True
        return self

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        if kind is None:  # (cut: the mark stays, for the 504)
            self.redis = False

    @contextlib.asynccontextmanager
    async def cut(self, stage: Stage | None = None) -> AsyncIterator[None]:
        """The block cut at the deadline, the 504 (`reached`) then, in `stage` (else the stage entered).
        Begun past the deadline, it runs until it would wait: what is at hand (a body that has all
        arrived) is taken, and the next stage's `enter` answers the 504."""
        if stage is not None:
            self.stage, self.redis = stage, False
        timeout = asyncio.timeout_at(self.loop_at())
        try:
            async with timeout:
                yield
        except TimeoutError:
            if not timeout.expired():
                raise
            raise self.reached() from None

    @contextlib.asynccontextmanager
    async def redis_call(self, stage: Stage) -> AsyncIterator[None]:
        """`on_redis`, with the block `cut` at the deadline."""
        with self.on_redis(stage):
            async with self.cut():
                yield

    def reached(self, detail: str | None = None) -> ServiceError:
        """The 504 for a request its deadline cut: the stage, whether it was waiting on Redis, and
        `detail` (what a late look found, `api.predictions`)."""
        message = f"no result within {self.timeout_s:g} s: the deadline was reached at the {self.stage} stage"
        if self.redis:
            message += ", waiting on Redis"
        return ServiceError(ErrorType.TIMEOUT, f"{message}: {detail}" if detail else message)


def request_deadline(scope: Scope, headers: Headers, most_s: float) -> Deadline:
    """An HTTP request's deadline, `X-Request-Timeout` (else `most_s`) from its arrival: kept in its
    scope by the first layer that asks. A bad header is the 422 of `requested_timeout`."""
    state = scope.setdefault("state", {})
    deadline: Deadline | None = state.get("deadline")
    if deadline is None:
        deadline = state["deadline"] = Deadline(requested_timeout(headers, most_s) or most_s)
    return deadline
