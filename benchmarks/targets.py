"""The issue's targets, as ratios of numbers measured in the same run. A benchmark reports; it
does not assert: each target is PASS, MISS, or n/a when its inputs were not measured."""

from __future__ import annotations

from typing import Any

HELD_MULTIPLES = (1.0, 2.0, 3.0)  # the multiples of saturation whose goodput is held to the in-time capacity


def _point(points: list[dict[str, Any]], concurrency: int) -> dict[str, Any] | None:
    return next((p for p in points if p["concurrency"] == concurrency), None)


def _target(name: str, value: float | None, goal: str, ok: bool | None) -> dict[str, Any]:
    status = "n/a" if value is None or ok is None else ("PASS" if ok else "MISS")
    return {"name": name, "value": None if value is None else round(value, 3), "goal": goal, "status": status}


def evaluate(results: dict[str, Any], clients: int = 32) -> list[dict[str, Any]]:
    limit = results.get("limit")
    naive = results.get("naive") or []
    service = (results.get("service") or {}).get("points") or []
    hits = (results.get("service") or {}).get("cache_hits")
    bare = results.get("bare") or []

    paired = (results.get("service") or {}).get("saturation")
    if paired:  # the limit measured beside each saturation round (see benchmarks.service.Reference)
        saturation, how = paired["median_ratio"], f"median of {len(paired['rounds'])} limit/service/limit rounds"
    else:
        best_limit = max((p["texts_per_s"] for p in limit["points"]), default=None) if limit else None
        best_service = max((p["texts_per_s"] for p in service), default=None)
        saturation = best_service / best_limit if best_service and best_limit else None
        how = "best of each"
    per = (results.get("settings") or {}).get("texts_per_request", 1)
    if per != 1:  # the API's work per text falls with longer requests: say so beside the ratio
        how += f", {per} texts a request"

    ours, theirs = _point(service, clients), _point(naive, clients)
    speedup = ours["texts_per_s"] / theirs["texts_per_s"] if ours and theirs and theirs["texts_per_s"] else None
    p99_ratio = ours["p99_ms"] / theirs["p99_ms"] if ours and theirs and ours["p99_ms"] and theirs["p99_ms"] else None
    bare_point = bare[0] if bare else None
    cache = hits["requests_per_s"] / bare_point["requests_per_s"] if hits and bare_point else None
    ceiling = results.get("ceiling")
    single = ceiling["points"][0] if ceiling else {}
    bare_ratio = ceiling["ratio_to_bare"] if ceiling else None
    outside = single.get("worker_outside_forward_us_per_text")
    api_cpu = single.get("api_cpu_us_per_request")
    by_part = [  # (the part whose run the target needs: `shown` leaves out those of parts not run, target)
        ("limit", _at_least(f"service / limit at saturation ({how})", saturation, 0.85)),
        ("naive", _at_least(f"service / naive at {clients} clients (sentences/s)", speedup, 4)),
        ("naive", _at_most(f"service p99 / naive p99 at {clients} clients", p99_ratio, 1)),
        ("bare", _at_least("cache hits / bare endpoint (requests/s)", cache, 0.5)),
        ("ceiling", _at_least("ceiling: 1-text misses / bare endpoint (requests/s, null engine)", bare_ratio, 0.4)),
        ("ceiling", _at_most("ceiling: worker CPU a text outside the forward (us)", outside, 100)),
        ("ceiling", _at_most("ceiling: API CPU a 1-text miss (us)", api_cpu, 300)),
        *(("fairness", t) for t in _fairness(results.get("fairness"))),
        *(("goodput", t) for t in _goodput(results.get("goodput"))),
    ]
    return [target | {"part": part} for part, target in by_part]


def shown(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The targets of the parts this run measured (a run of some parts lists no others' n/a)."""
    return [t for t in results["targets"] if "part" not in t or results.get(t["part"])]


def _goodput(goodput: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The issue's goodput targets, for the `deadline` policy (only where the part ran): goodput at
    1x, 2x and 3x saturation against the in-time capacity C, under the bench's open loop and k6's;
    refusals' p99 at 3x (as the client saw it, and as the API timed it) and their API CPU; the share
    computed for nobody (the worst point); the interactive p99 beside a bulk job against alone. The
    `queue-length` policy is the baseline the table shows beside it."""
    if not goodput:
        return []
    deadline = goodput["policies"].get("deadline") or {}
    capacity = (goodput.get("capacity") or {}).get("in_time_texts_per_s")
    targets = []
    for generator, points in (("bench", deadline.get("points", [])), ("k6", deadline.get("k6", []))):
        by_multiple = {p["multiple"]: p for p in points}
        for multiple in HELD_MULTIPLES:
            point = by_multiple.get(multiple)
            ratio = point["goodput_per_s"] / capacity if point and capacity else None
            targets.append(
                _at_least(f"goodput: at {multiple:g}x saturation / in-time capacity ({generator})", ratio, 0.9)
            )
    at_3x: dict[str, Any] = next((p for p in deadline.get("points", []) if p["multiple"] == 3.0), {})
    shares = [p["share_for_nobody"] for p in deadline.get("points", []) if p.get("share_for_nobody") is not None]
    worst = max(shares) if shares else None
    beside = (deadline.get("beside_job") or {}).get("p99_ratio_to_alone")
    return [
        *targets,
        _at_most("goodput: refusals' p99 at 3x, as the client saw it (ms)", at_3x.get("refusal_p99_ms"), 5),
        _at_most(
            "goodput: refusals' p99 at 3x, as the API timed it (ms, its histogram's bucket)",
            at_3x.get("refusal_p99_ms_at_api"),
            5,
        ),
        _at_most(
            "goodput: API CPU a refused request (us, every request refused)",
            (goodput.get("refusals") or {}).get("api_cpu_us_per_answer"),
            150,
        ),
        _at_most("goodput: share of computed texts for nobody (worst point)", worst, 0.05),
        _at_most("goodput: interactive p99 at 0.5x beside a bulk job / alone", beside, 1.2),
    ]


def _at_most(name: str, value: float | None, most: float) -> dict[str, Any]:
    return _target(name, value, f"<= {most:g}", None if value is None else value <= most)


def _at_least(name: str, value: float | None, least: float) -> dict[str, Any]:
    return _target(name, value, f">= {least:g}", None if value is None else value >= least)


def _fairness(fairness: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The quiet client's p99 beside the flood against its p99 alone plus one forward, and the total
    throughput against the single queue's (within noise: 10%)."""
    p99, allowed = (fairness or {}).get("quiet_p99_ms"), (fairness or {}).get("quiet_p99_allowed_ms")
    ratio = (fairness or {}).get("throughput_ratio_to_one_queue")
    return [
        _target(
            "fairness: quiet client's p99 beside a flood (ms)",
            p99,
            f"<= {allowed} (alone + a full batch's forward)"
            if allowed
            else "<= its p99 alone + a full batch's forward",
            None if p99 is None or allowed is None else p99 <= allowed,
        ),
        _at_least("fairness: throughput / one queue's (texts/s)", ratio, 0.9),
    ]
