"""The Open Inference Protocol (KServe V2) over gRPC, beside its REST routes and on the same path.

`inference.GRPCInferenceService` (api/grpc_v2/grpc_predict_v2.proto), the service tritonclient.grpc
and kserve's InferenceGRPCClient call, runs on grpc.aio in the API process, on the event loop the
HTTP routes run on: a call's texts go through the same `Predictor` as /predict's, so the same cache,
queue, limits and access control apply. What differs from REST is carried by gRPC itself:

- ModelInfer's input is one BYTES tensor of texts, shape `[n]` or `[n, 1]`, in `raw_input_contents`
  (tritonclient's way: a little-endian uint32 length, then the UTF-8 bytes, per text) or in
  `contents.bytes_contents`; its outputs `label` and `scores` (as over REST) are answered in
  `raw_output_contents`, as Triton answers them; the `x-cache` trailing metadata says hit, miss or partial.
- The call's deadline is its request's deadline where it comes before SENTIMENT_REQUEST_TIMEOUT_S,
  from the call's arrival (`api.deadline`: its rate limit and model lookup count against it): the
  work item carries it, and a worker skips the work once the caller gave up.
- Errors are gRPC status codes, from `api.errors.ERRORS` (each error's `grpc_status`): overload and outages UNAVAILABLE,
  the deadline DEADLINE_EXCEEDED, another model NOT_FOUND, bad input INVALID_ARGUMENT (REST's 422),
  a message over the request limit RESOURCE_EXHAUSTED (grpc's own check).
- API keys ride in the `authorization: Bearer KEY` or `x-api-key` metadata; ServerLive and
  ServerReady are open, as /v2/health/live and /v2/health/ready are.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Awaitable
from typing import Any, NoReturn, TypeVar
from urllib.parse import unquote

import grpc
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from redis.exceptions import RedisError
from starlette.datastructures import Headers

from api.access import ApiKeys, Refused, admit, presented_key
from api.deadline import Deadline, Stage
from api.errors import ErrorType, ServiceError, counted
from api.grpc_v2 import grpc_predict_v2_pb2 as pb
from api.grpc_v2 import grpc_predict_v2_pb2_grpc as pb_grpc
from api.inference_protocol import (
    OUTPUTS,
    checked_texts,
    infer_body_limit,
    invalid,
    model_metadata_body,
    output_tensors,
    served,
    server_metadata_body,
    unpack_bytes,
)
from api.predictions import Predictor
from api.routes import readiness
from core.protocol import DEFAULT_CLIENT, new_id
from core.redis_errors import describe
from core.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")


class GrpcServer:
    """The API's gRPC server: bound in the serving event loop before the app starts (`bind`: a taken
    port is one line, exit 1), started by the app's lifespan once its `Predictor` exists, stopped by it."""

    def __init__(self, settings: Settings, host: str, port: int) -> None:
        self.settings = settings
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.port = port
        self._server: grpc.aio.Server | None = None

    def bind(self) -> None:
        """Make the server and bind its port; call it in the loop that will run it (grpc.aio's rule)."""
        limit = infer_body_limit(self.settings.max_texts, self.settings.max_chars)
        # No SO_REUSEPORT (grpc's default): a second process on the port must fail, not share its calls.
        self._server = grpc.aio.server(options=[("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", limit)])
        try:
            self.port = self._server.add_insecure_port(self.address)
        except RuntimeError:
            raise SystemExit(
                f"sentiment: cannot listen for gRPC on {self.address}: another process holds it? "
                "choose one with --grpc-port (0: no gRPC)"
            ) from None

    async def start(self, app: FastAPI) -> None:
        if self._server is None:
            self.bind()
        assert self._server is not None
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceService(app, self.settings), self._server)
        await self._server.start()
        log.info("gRPC (Open Inference Protocol) on %s", self.address.rsplit(":", 1)[0] + f":{self.port}")

    async def stop(self, grace_s: float) -> None:
        """Refuse new calls, and end those in flight after `grace_s`."""
        if self._server is not None:
            await self._server.stop(grace_s)


async def abort(context: grpc.aio.ServicerContext, error_type: ErrorType, message: str) -> NoReturn:
    """End the call with `error_type`'s gRPC status (a refusal counted, as over HTTP)."""
    await context.abort(counted(error_type).grpc_status, message)
    raise AssertionError("unreachable: abort raises")  # (grpc's stubs do not say it never returns)


def validation_message(exc: RequestValidationError) -> str:
    """A 422's errors in one line: where, and what is wrong."""
    return "; ".join(
        f"{'.'.join(str(part) for part in error['loc'][1:]) or 'request'}: {error['msg']}" for error in exc.errors()
    )


class InferenceService(pb_grpc.GRPCInferenceServiceServicer):
    """The RPCs, reading what the app's lifespan made (`app.state`) at each call."""

    def __init__(self, app: FastAPI, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self.keys = ApiKeys(settings.api_keys or [])
        self.checked = bool(settings.api_keys) or settings.rate_limit_per_s is not None

    async def ServerLive(self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext) -> Any:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext) -> Any:
        return pb.ServerReadyResponse(ready=not isinstance(await readiness(self.app.state), str))

    async def ModelReady(self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext) -> Any:
        await self._client(context, self._deadline(context))
        if isinstance(await readiness(self.app.state), str):
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=await self._answer(context, self._served(request.name, ErrorType.NOT_READY)))

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext) -> Any:
        await self._client(context, self._deadline(context))
        return pb.ServerMetadataResponse(**server_metadata_body(self.app))

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext) -> Any:
        await self._client(context, self._deadline(context))
        metadata = model_metadata_body(await self._answer(context, served(self.app.state.models, request.name)))
        del metadata["labels"]  # (no such field in the message: GET /model and REST's metadata have them)
        return pb.ModelMetadataResponse(**metadata)

    async def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext) -> Any:
        deadline = self._deadline(context)
        client = await self._client(context, deadline)
        return await self._answer(context, self._infer(request, context, client, deadline))

    def _deadline(self, context: grpc.aio.ServicerContext) -> Deadline:
        """The call's deadline, as it arrives: its own where that comes before the request timeout."""
        most_s, remaining = self.settings.request_timeout_s, context.time_remaining()
        return Deadline(most_s if remaining is None else min(remaining, most_s))

    async def _served(self, name: str, missing: ErrorType) -> bool:
        try:
            await served(self.app.state.models, name, missing)
        except ServiceError:
            return False
        return True

    async def _infer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext, client: str, deadline: Deadline
    ) -> Any:
        async with deadline.redis_call(Stage.MODEL_LOOKUP):
            info = await served(self.app.state.models, request.model_name)  # first: another model is NOT_FOUND
        texts = self._texts(request)
        wanted = {o.name for o in request.outputs} or set(OUTPUTS)
        if unknown := wanted - set(OUTPUTS):
            raise invalid(("outputs",), f"the outputs are {' and '.join(OUTPUTS)}", sorted(unknown))
        predictor: Predictor = self.app.state.predictor
        predictions, cache = await predictor.predict(texts, client, deadline=deadline)
        response = pb.ModelInferResponse(model_name=info.name, model_version=info.version, id=request.id or new_id())
        for name, tensor in output_tensors(predictions).items():
            if name in wanted:
                response.outputs.add(name=name, datatype=tensor["datatype"], shape=tensor["shape"])
                response.raw_output_contents.append(raw_tensor(tensor["datatype"], tensor["data"]))
        context.set_trailing_metadata((("x-cache", cache.value),))
        return response

    def _texts(self, request: pb.ModelInferRequest) -> list[str]:
        """The one BYTES input's texts, from `raw_input_contents` or `contents.bytes_contents`."""
        if len(request.inputs) != 1:
            raise invalid(("inputs",), "one input: the texts", len(request.inputs))
        tensor = request.inputs[0]
        where: tuple[str | int, ...] = ("inputs", 0)
        if tensor.datatype != "BYTES":
            raise invalid((*where, "datatype"), "the texts are BYTES", tensor.datatype)
        elements, raw = tensor.contents.bytes_contents, request.raw_input_contents
        if elements and raw:
            raise invalid(where, "data sent both in contents and as raw_input_contents", {})
        if elements:
            try:
                texts = [element.decode() for element in elements]
            except UnicodeDecodeError:
                raise invalid((*where, "contents"), "a text is not valid UTF-8", {}) from None
        elif len(raw) == 1:
            texts = unpack_bytes(raw[0], ("raw_input_contents", 0))
        else:
            raise invalid(where, "no data: send it in contents.bytes_contents or one raw_input_contents", {})
        return checked_texts(list(tensor.shape), texts, self.settings.max_texts, self.settings.max_chars)

    async def _client(self, context: grpc.aio.ServicerContext, deadline: Deadline) -> str:
        """Who calls, as over HTTP (`api.access.admit`, by `deadline`): the work's client, or the call
        ends refused."""
        if not self.checked:
            return DEFAULT_CLIENT
        metadata = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
        presented = presented_key(Headers(headers=metadata))
        # The peer is a URI: `ipv4:10.0.0.1:port`, `ipv6:%5B::1%5D:port`.
        address = unquote(context.peer()).rsplit(":", 1)[0].removeprefix("ipv4:").removeprefix("ipv6:")
        client = await admit(self.keys, getattr(self.app.state, "rate_limit", None), presented, address, deadline)
        if isinstance(client, Refused):
            await abort(context, client.error_type, client.message)
        return client if self.keys else DEFAULT_CLIENT

    @staticmethod
    async def _answer(context: grpc.aio.ServicerContext, call: Awaitable[T]) -> T:
        """`call`'s answer, or the call ended with the gRPC status of what went wrong."""
        try:
            return await call
        except ServiceError as exc:
            await abort(context, exc.error_type, exc.message)
        except RequestValidationError as exc:
            await abort(context, ErrorType.INVALID_REQUEST, validation_message(exc))
        except RedisError as exc:
            log.warning("redis unavailable (%s)", describe(exc))
            await abort(
                context, ErrorType.UNAVAILABLE, f"the queue backend (Redis) is unavailable ({type(exc).__name__})"
            )
        raise AssertionError("unreachable: abort raises")


def raw_tensor(datatype: str, data: list[Any]) -> bytes:
    """A tensor's raw contents: FP32 little-endian, or BYTES as a uint32 length and the UTF-8 bytes each."""
    if datatype == "FP32":
        return struct.pack(f"<{len(data)}f", *data)
    encoded = [str(value).encode() for value in data]
    return b"".join(struct.pack("<I", len(value)) + value for value in encoded)
