"""The wire protocol: round trips, and no user text in any key name."""

import orjson

from core.protocol import (
    Keys,
    ModelInfo,
    Result,
    WorkerStatus,
    WorkItem,
    new_id,
    parse_replies,
    prediction,
    replies,
    text_digest,
)


def test_work_item_round_trip() -> None:
    item = WorkItem(
        id=new_id(), texts=["I love you.", "", "ünï ☃"], enqueued_at=1.5, deadline=11.5, reply_to="p:done:x"
    )
    assert WorkItem.decode(item.encode()) == item


def test_result_round_trip_with_predictions_and_with_error() -> None:
    ok = Result(predictions=[prediction(["NEGATIVE", "POSITIVE"], [0.25, 0.75])])
    assert Result.decode(ok.encode()) == ok
    assert ok.predictions == [[{"label": "NEGATIVE", "score": 0.25}, {"label": "POSITIVE", "score": 0.75}]]
    failed = Result(error="boom")
    assert Result.decode(failed.encode()) == failed


def test_a_reply_carries_each_request_id_and_result_and_reads_a_bare_id() -> None:
    first, second = new_id(), new_id()
    ok = Result(predictions=[prediction(["NEGATIVE", "POSITIVE"], [0.25, 0.75])]).encode()
    failed = Result(error="line one\nline two").encode()  # JSON escapes the newline: one line per request
    assert parse_replies(replies([(first, ok), (second, failed)])) == [(first, ok), (second, failed)]
    assert parse_replies(replies([(first, ok)])) == [(first, ok)]  # what a worker answering one request sends
    assert parse_replies(first.encode()) == [(first, None)]  # what workers before replies sent


def test_model_info_and_worker_status_round_trip() -> None:
    info = ModelInfo(name="m", version="abc", labels=["NEGATIVE", "POSITIVE"], device="cpu", dtype="float32")
    assert ModelInfo.decode(info.encode()) == info
    status = WorkerStatus(id="w", host="h", pid=1, model_version="abc", started_at=2.0, batches=3)
    assert WorkerStatus.decode(status.encode()) == status
    # Mid rolling update, a field that a newer API or worker sends is ignored, whatever the message.
    for message in (info, status, WorkItem("i", ["t"], 1.0, 2.0, "c"), Result(error="boom")):
        newer = orjson.dumps({**orjson.loads(message.encode()), "added_later": 1})
        assert type(message).decode(newer) == message
    # And a field added later is read with its default from an older sender.
    older = {k: v for k, v in orjson.loads(info.encode()).items() if k != "engine"}
    assert ModelInfo.decode(orjson.dumps(older)) == info and info.engine == ""


def test_cache_keys_name_texts_by_digest_and_model_version() -> None:
    keys = Keys("sentiment")
    text = "my secret review"
    key = keys.cache("v1", text)
    assert text not in key and "secret" not in key
    assert key == f"sentiment:cache:v1:{text_digest(text)}"
    assert keys.cache("v1", text) == key  # stable
    assert keys.cache("v2", text) != key  # a new model never reads an old model's results
    assert keys.cache("v1", text + " ") != key


def test_ids_are_random_and_long() -> None:
    ids = {new_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(len(i) == 32 for i in ids)
