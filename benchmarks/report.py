"""A run's results as files: the JSON record, PNG plots, and the markdown block docs/performance.md shows."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.targets import shown


def results_dir(out: Path, command: str) -> Path:
    """`out`, made and found writable before the run: its results are written at its end, where a
    directory that could not be made was a traceback, the whole run lost."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()
    except OSError as exc:
        raise SystemExit(
            f"sentiment {command}: cannot write results in {out} ({exc.strerror}): name another with --out"
        ) from None
    return out


def writable_file(path: Path, option: str, command: str) -> Path:
    """`path`, found readable and writable (or creatable) before the run: it is written at the run's
    end, where a directory or a file it could not write was a traceback, the whole run over."""
    try:
        if path.exists():
            path.open("r+").close()
        else:
            tempfile.TemporaryFile(dir=path.parent).close()
    except OSError as exc:
        raise SystemExit(f"{command}: cannot write {path} ({exc.strerror}): name another with {option}") from None
    return path


def replace_block(doc: Path, name: str, body: str) -> None:
    """Put `body` between `<!-- name -->` and `<!-- /name -->` in `doc`, appending the pair if absent."""
    start, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    block = f"{start}\n{body.strip()}\n{end}"
    text = doc.read_text() if doc.exists() else ""
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), flags=re.DOTALL)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else f"{text.rstrip()}\n\n{block}\n".lstrip()
    doc.write_text(text)


def plots(results: dict[str, Any], out: Path, tag: str) -> list[Path]:
    """One PNG per measured part: limit per batch size, service vs naive per concurrency, cache vs bare
    (matplotlib imported here: a command refused before it runs never pays for that import)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    written = []
    limit, naive, bare = results.get("limit"), results.get("naive") or [], results.get("bare") or []
    service = results.get("service") or {}
    points = service.get("points") or []
    if limit:
        fig, ax = plt.subplots(figsize=(6.4, 4))
        sizes = [p["batch_size"] for p in limit["points"]]
        ax.bar(
            range(len(sizes)),
            [p["texts_per_s"] for p in limit["points"]],
            color="#7a9cc6",
            label="(1) model forward (limit)",
            tick_label=[str(s) for s in sizes],
        )
        if points:
            ax.axhline(max(p["texts_per_s"] for p in points), color="#2a7", label="(3) service, best")
        if naive:
            ax.axhline(max(p["texts_per_s"] for p in naive), color="#c55", ls="--", label="(2) naive, best")
        ax.set(xlabel="batch size", ylabel="sentences/s", title=f"Limit: raw forward throughput ({tag})")
        ax.legend()
        written.append(_save(fig, out / f"{tag}-limit.png"))
    if points or naive:
        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
        for name, series, style, color in (("(3) service", points, "o-", "#2a7"), ("(2) naive", naive, "s--", "#c55")):
            if series:
                xs = [p["concurrency"] for p in series]
                left.plot(xs, [p["texts_per_s"] for p in series], style, color=color, label=name)
                right.plot(xs, [p["p99_ms"] for p in series], style, color=color, label=f"{name} p99")
                right.plot(xs, [p["p50_ms"] for p in series], style, color=color, alpha=0.4, label=f"{name} p50")
        clients = sorted({p["concurrency"] for p in [*points, *naive]})
        left.set(xscale="log", xlabel="concurrent clients", ylabel="sentences/s", title="Throughput")
        right.set(xscale="log", yscale="log", xlabel="concurrent clients", ylabel="latency (ms)", title="Latency")
        for ax in (left, right):
            ax.set_xticks(clients, [str(c) for c in clients])
            ax.xaxis.set_minor_locator(NullLocator())
        left.legend()
        right.legend(fontsize="small")
        fig.suptitle(f"Service end to end vs naive baseline ({tag})")
        written.append(_save(fig, out / f"{tag}-service.png"))
    if service.get("cache_hits") and bare:
        fig, ax = plt.subplots(figsize=(6.4, 4))
        subjects = {"(4) cache hits": service["cache_hits"], "bare endpoint": bare[0]}
        bars = ax.bar(
            range(2),
            [p["requests_per_s"] for p in subjects.values()],
            color=["#2a7", "#999"],
            tick_label=list(subjects),
        )
        ax.bar_label(bars, labels=[f"p99 {p['p99_ms']} ms" for p in subjects.values()])
        ax.set(ylabel="requests/s", title=f"Cache-hit path vs bare FastAPI ({tag}, {bare[0]['concurrency']} clients)")
        written.append(_save(fig, out / f"{tag}-cache.png"))
    return written


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt  # (imported by `plots`)

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _cell(value: Any) -> str:
    return "–" if value is None else str(value)


def _goodput_lines(goodput: dict[str, Any]) -> list[str]:
    """The goodput part: C and its closed loops in a line, then one row a point (k6's rows: a dash
    where its summary has no such figure; its given-up requests count as late)."""
    capacity = goodput.get("capacity") or {}
    loops = "; ".join(
        f"{p['concurrency']}: {p['texts_per_s']}/s, p99 {_cell(p['p99_ms'])} ms, API {_cell(p.get('api_cpu_us_per_answer'))} µs"
        for p in capacity.get("points", [])
    )
    lines = [
        f"**In-time capacity** C = {_cell(capacity.get('in_time_texts_per_s'))} texts/s, the best closed loop "
        f"within the {goodput['deadline_s']:g}-s deadline (clients: texts, p99, the API's CPU an answer; {loops})."
        + _refusals_alone(goodput.get("refusals")),
        "",
        f"**Goodput** (open loop at multiples of the saturation rate, {goodput['saturation_texts_per_s']} "
        f"texts/s; every request due within {goodput['deadline_s']:g} s; each overload policy on fresh "
        f"processes, {_apis(goodput)}; 0.5x again beside a bulk job; k6's rows `k6/goodput.js`, its given-up requests late; "
        "refusals' p99 as the client saw it and as the API timed it, to its histogram's bucket; the API's "
        "CPU an answer; the cores of the model worker, the APIs together and the load generator)",
        "",
        "| policy | load | sent | goodput/s | p99 ms | refused | refusals' p99 ms (client / API) | late (504) | "
        "gave up | computed | for nobody | API µs an answer | cores (model / API / client) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for policy, run in goodput["policies"].items():
        rows = [(f"{p['multiple']:g}x", p) for p in run["points"]] + [("0.5x + job", run["beside_job"])]
        lines += [
            f"| {policy} | {load} | {p['sent']} | {p['goodput_per_s']} | {_cell(p['p99_ms'])} | {p['refused']} | "
            f"{_cell(p['refusal_p99_ms'])} / {_cell(p.get('refusal_p99_ms_at_api'))} | {p['late']} | "
            f"{p['gave_up']} | {p['computed_texts']} | {_cell(p['share_for_nobody'])} | "
            f"{_cell(p.get('api_cpu_us_per_answer'))} | {_cores(p.get('cores'))} |"
            for load, p in rows
        ]
        lines += [
            f"| {policy}, k6 | {p['multiple']:g}x | {p['sent']} | {p['goodput_per_s']} | – | {p['refused']} | "
            f"{_cell(p['refusal_p99_ms'])} / – | {p['late']} | – | – | – | "
            f"{_cell(p.get('api_cpu_us_per_answer'))} | – / – / {_cell(p.get('client_cores'))} |"
            for p in run.get("k6", [])
        ]
    return lines


def _apis(goodput: dict[str, Any]) -> str:
    """How many API processes the goodput points ran (one in older results files)."""
    apis = goodput.get("api_processes", 1)
    return f"{apis} API processes side by side" if apis > 1 else "one API process"


def _refusals_alone(refusals: dict[str, Any] | None) -> str:
    """The capacity paragraph's sentence on an API refusing everything (none in older results files)."""
    return (
        f" **A refusal alone**: an API refusing every request, sent {refusals['rate_per_s']} a second (the 3x "
        f"rate) open loop, spends {_cell(refusals.get('api_cpu_us_per_answer'))} µs of CPU on each (p99 "
        f"{_cell(refusals['refusal_p99_ms'])} ms as the client saw it)."
        if refusals
        else ""
    )


def _cores(cores: dict[str, float] | None) -> str:
    """A goodput point's cores: the model worker's, the API's and the load generator's."""
    return " / ".join(_cell(cores.get(k)) for k in ("model_worker", "api", "client")) if cores else "–"


def markdown(results: dict[str, Any], results_file: Path, plot_files: list[Path], doc_dir: Path) -> str:
    """The block docs/performance.md shows for one device: machine, targets, tables, plots."""
    m, s = results["machine"], results["settings"]
    rel = lambda p: Path(os.path.relpath(p, doc_dir)).as_posix()  # noqa: E731
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ""
    bf16 = {True: ", bfloat16 in hardware", False: ", no bfloat16 in hardware"}.get(m.get("bf16_native"), "")
    workers = s.get("workers", 1)
    count = s.get("worker_threads") or m["torch_threads"]
    threads = f"{count} thread{'s' if count != 1 else ''}" + (f" in each of {workers} workers" if workers > 1 else "")
    lines = [
        f"Run {m['date']} on **{m['cpu']}** ({m['cores']} cores{bf16}{gpu}), "
        f"torch {m['torch']} ({threads}, OpenMP waiting "
        f"`{s.get('omp_wait_policy', 'runtime default')}`), device `{m['device']}`; "
        f"model `{s['model']}` ({Path(s['model_source']).name}), precision `{s['precision']}` "
        f"(the limit, naive baseline and worker alike), engine `{s.get('engine', 'torch')}` (the limit and "
        "worker; the naive baseline runs the transformers pipeline on torch); "
        f"{s['duration_s']} s per point after {s['warmup_s']} s warm-up; command `{s['command']}`. "
        f"Results: [{results_file.name}]({rel(results_file)}).",
        "",
        *([f"**Failed parts**: {results['failed']}", ""] if results.get("failed") else []),
        "| target | measured | goal | |",
        "| --- | --- | --- | --- |",
        *(f"| {t['name']} | {_cell(t['value'])} | {t['goal']} | **{t['status']}** |" for t in shown(results)),
    ]
    if limit := results.get("limit"):
        copies = f"; {limit['copies']} copies side by side, as the workers run" if limit.get("copies", 1) > 1 else ""
        lanes = (
            f"; {limit['lanes']} forward lanes side by side, as the worker runs" if limit.get("lanes", 1) > 1 else ""
        )
        lines += [
            "",
            f"**(1) Limit** (model forward only, length-sorted windows of 512{copies}{lanes})",
            "",
            "| batch size | sentences/s | mean padded tokens |",
            "| --- | --- | --- |",
        ]
        lines += [f"| {p['batch_size']} | {p['texts_per_s']} | {p['mean_padded_tokens']} |" for p in limit["points"]]
    rows = [("(2) naive", p) for p in results.get("naive") or []]
    rows += [("(3) service", p) for p in (results.get("service") or {}).get("points") or []]
    if rows:
        apis = s.get("api_processes", 1)
        per = s.get("texts_per_request", 1)
        each = "one never-seen sentence" if per == 1 else f"{per} never-seen sentences"
        lines += [
            "",
            f"**(2) naive baseline and (3) this service** ({each} per request; "
            f"{apis} API process{'es' if apis > 1 else ''} and {workers} worker{'s' if workers > 1 else ''})",
            "",
            "| subject | clients | sentences/s | p50 ms | p95 ms | p99 ms | mean batch | queue wait ms | errors |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        lines += [
            f"| {name} | {p['concurrency']} | {p['texts_per_s']} | {_cell(p['p50_ms'])} | {_cell(p['p95_ms'])} | "
            f"{_cell(p['p99_ms'])} | {_cell(p.get('mean_batch_size'))} | {_cell(p.get('mean_queue_wait_ms'))} | "
            f"{p['errors']} |"
            for name, p in rows
        ]
    if paired := (results.get("service") or {}).get("saturation"):
        lines += [
            "",
            f"**Saturation rounds** ({paired['clients']} clients; the limit at batch "
            f"{paired['limit_batch_size']} measured right before and after each service point)",
            "",
            "| round | limit before | service | limit after | service / mean limit |",
            "| --- | --- | --- | --- | --- |",
        ]
        lines += [
            f"| {i} | {r['limit_before']} | {r['service']} | {r['limit_after']} | {r['ratio']} |"
            for i, r in enumerate(paired["rounds"], start=1)
        ]
    if ceiling := results.get("ceiling"):
        lines += [
            "",
            f"**(5) Ceiling** (the null engine: no model; 1 API process and 1 worker, {ceiling['clients']} "
            "clients; CPU per request and per text from /proc and the worker's own stage clocks)",
            "",
            "| subject | texts a request | requests/s | texts/s | p99 ms | API CPU us a request | "
            "worker CPU us a text | outside the forward us a text (take / plan / reply) | cores API / worker / Redis |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for p in ceiling["points"]:
            st, cores = p["worker_stage_cpu_us_per_text"], p["cores"]
            lines.append(
                f"| service | {p['texts_per_request']} | {p['requests_per_s']} | {p['texts_per_s']} | {_cell(p['p99_ms'])} | "
                f"{p['api_cpu_us_per_request']} | {p['worker_cpu_us_per_text']} | {p['worker_outside_forward_us_per_text']} "
                f"({st['take']} / {st['plan']} / {st['reply']}) | {cores['api']} / {cores['worker']} / {cores['redis']} |"
            )
        b = ceiling["bare"]
        lines.append(
            f"| bare endpoint | 1 | {b['requests_per_s']} | {b['texts_per_s']} | {_cell(b['p99_ms'])} | – | – | – | – |"
        )
    if fair := results.get("fairness"):
        flood = fair["flood"]
        lines += [
            "",
            f"**(6) Fairness** (API keys on: a flood client at {flood['connections']} connections, "
            f"{flood['texts_per_request']} texts a request, beside a quiet client at 1 connection, 1 text)",
            "",
            "| point | quiet p50 ms | quiet p99 ms | flood p99 ms | texts/s in all | mean forward ms |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for name, label in (
            ("quiet_alone", "quiet client alone"),
            ("one_queue", "both under one key (one FIFO queue)"),
            ("fair", "each under its own key (served in turn)"),
        ):
            p = fair["points"][name]
            lines.append(
                f"| {label} | {_cell(p['quiet']['p50_ms'])} | {_cell(p['quiet']['p99_ms'])} | "
                f"{_cell((p.get('flood') or {}).get('p99_ms'))} | {p['texts_per_s']} | {_cell(p.get('mean_forward_ms'))} |"
            )
    if cancel := results.get("cancel"):
        lines += [
            "",
            f"**Cancel** ({cancel['clients']} clients giving up after {cancel['give_up_s']:g} s, far more than "
            "the worker serves; the queue limit off; the worker's dropping of abandoned work off, then on)",
            "",
            "| dropping | answers/s | p99 ms | gave up | texts computed | of them for nobody | share |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        lines += [
            f"| {'on' if p['drop_abandoned'] else 'off'} | {p['requests_per_s']} | {_cell(p['p99_ms'])} | "
            f"{p['gave_up']} | {p['computed_texts']} | {p['texts_for_nobody']} | {_cell(p['share_for_nobody'])} |"
            for p in cancel["points"]
        ]
    if goodput := results.get("goodput"):
        lines += ["", *_goodput_lines(goodput)]
    cache = [("(4) cache hits", (results.get("service") or {}).get("cache_hits"))]
    cache += [("bare endpoint", p) for p in results.get("bare") or []]
    if any(p for _, p in cache):
        lines += [
            "",
            "**(4) cache-hit path vs a bare FastAPI endpoint** (same client, same concurrency)",
            "",
            "| subject | clients | requests/s | p50 ms | p99 ms | client CPU share |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        lines += [
            f"| {name} | {p['concurrency']} | {p['requests_per_s']} | {_cell(p['p50_ms'])} | {_cell(p['p99_ms'])} | "
            f"{p['client_cpu_share']} |"
            for name, p in cache
            if p
        ]
    lines += ["", *(f"![{p.stem}]({rel(p)})" for p in plot_files)]
    return "\n".join(lines)
