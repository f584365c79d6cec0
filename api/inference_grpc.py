"""The Open Inference Protocol (KServe V2) over gRPC, beside its REST routes and on the same path:
`api.inference`'s calls, their requests decoded from protobuf and their answers encoded in it.

`inference.GRPCInferenceService` (api/grpc_v2/grpc_predict_v2.proto), the service tritonclient.grpc
and kserve's InferenceGRPCClient call, runs on grpc.aio in the API process, on the event loop the
HTTP routes run on: a call's texts go through the same `Predictor` as /predict's, so the same cache,
queue, limits and access control apply. What differs from REST is carried by gRPC itself:

- ModelInfer's texts come in `raw_input_contents` (tritonclient's way: the binary layout, a
  little-endian uint32 length, then the UTF-8 bytes, per text) or in `contents.bytes_contents`; its
  outputs are answered in `raw_output_contents`, as Triton answers them; the `x-cache` trailing
  metadata says hit, miss or partial. A request is validated as REST's JSON is (`api.inference`):
  the same rules and messages, located without REST's `body`.
- The call's deadline is its request's deadline where it comes before SENTIMENT_REQUEST_TIMEOUT_S,
  from the call's arrival (`api.deadline`: its rate limit and model lookup count against it): the
  work item carries it, and a worker skips the work once the caller gave up.
- Errors are gRPC status codes, each error's `grpc_status` (`api.errors.ERRORS`, mapped by
  `api.errors.failure` as over HTTP): overload and outages UNAVAILABLE, the deadline
  DEADLINE_EXCEEDED, another model NOT_FOUND, bad input INVALID_ARGUMENT (REST's 422), a bug
  INTERNAL, a message over the request limit RESOURCE_EXHAUSTED (grpc's own check); where REST's
  answer has `Retry-After`, the `grpc-retry-pushback-ms` trailing metadata says the same wait.
- ServerReady and ModelReady answer `api.inference.ready` as a bool: another model's name, or a
  service not ready, is `ready: false` (REST's 404 and 503).
- API keys ride in the `authorization: Bearer KEY` or `x-api-key` metadata; ServerLive and
  ServerReady are open, as /v2/health/live and /v2/health/ready are. Behind a proxy that
  `FORWARDED_ALLOW_IPS` names, the client is the one its `x-forwarded-for` names, as over HTTP.
"""

from __future__ import annotations

import functools
import logging
import struct
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, NoReturn, TypeVar
from urllib.parse import unquote

import grpc
from fastapi import FastAPI
from google.protobuf.unknown_fields import UnknownFieldSet  # type: ignore[import-not-found]  # (no stubs yet)
from starlette.datastructures import Headers

from api import inference
from api.access import ApiKeys, Denied, ForwardedFor, check, presented_key
from api.deadline import Deadline
from api.errors import ErrorType, ServiceError, counted, failure
from api.grpc_v2 import grpc_predict_v2_pb2 as pb
from api.grpc_v2 import grpc_predict_v2_pb2_grpc as pb_grpc
from api.inference import Inference, InferRequest, infer_body_limit, packed
from core.protocol import DEFAULT_CLIENT
from core.settings import Settings

log = logging.getLogger(__name__)
# gRPC's channel arguments are C ints, and it takes no larger message: where the text limits allow a
# larger request, this is the limit (a larger value cannot even be set).
MOST_MESSAGE_BYTES = 2**31 - 1
Service = TypeVar("Service", bound="InferenceService")
Message = TypeVar("Message")
Answer = TypeVar("Answer")
Rpc = Callable[[Service, Message, grpc.aio.ServicerContext], Awaitable[Answer]]


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
        limit = min(infer_body_limit(self.settings.max_texts, self.settings.max_chars), MOST_MESSAGE_BYTES)
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
        log.info("gRPC (Open Inference Protocol) on %s", self.bound)

    @property
    def bound(self) -> str:
        """The address it listens on, `host:port` with the port it got (`--grpc-port 0`: one chosen)."""
        return self.address.rsplit(":", 1)[0] + f":{self.port}"

    async def stop(self, grace_s: float) -> None:
        """Refuse new calls, and end those in flight after `grace_s`."""
        if self._server is not None:
            await self._server.stop(grace_s)


async def abort(context: grpc.aio.ServicerContext, error: ServiceError) -> NoReturn:
    """End the call with its error's gRPC status (a refusal counted, as over HTTP), and HTTP's
    `Retry-After` as the retry pushback of gRPC's retry policies (gRFC A6)."""
    spec = counted(error.error_type)
    retry = error.retry_after_s or spec.retry_after_s
    pushback = (("grpc-retry-pushback-ms", str(retry * 1000)),) if retry else ()
    await context.abort(spec.grpc_status, error.message, trailing_metadata=pushback)
    raise AssertionError("unreachable: abort raises")  # (grpc's stubs do not say it never returns)


def answered(rpc: Rpc[Service, Message, Answer]) -> Rpc[Service, Message, Answer]:
    """The RPC's answer, or the call ended with the gRPC status of what went wrong (`failure`)."""

    @functools.wraps(rpc)
    async def call(self: Service, request: Message, context: grpc.aio.ServicerContext) -> Answer:
        try:
            return await rpc(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            error = failure(exc)
            if error.error_type is ErrorType.INTERNAL:
                log.error("gRPC %s failed", rpc.__name__, exc_info=exc)
            await abort(context, error)

    return call


class InferenceService(pb_grpc.GRPCInferenceServiceServicer):
    """The RPCs, reading what the app's lifespan made (`app.state`) at each call."""

    def __init__(self, app: FastAPI, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self.keys = ApiKeys(settings.api_keys or [])
        self.checked = bool(settings.api_keys) or settings.rate_limit_per_s is not None
        self.forwarded = ForwardedFor()
        self.inference = Inference(settings.max_texts, settings.max_chars)

    @answered
    async def ServerLive(self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext) -> Any:
        return pb.ServerLiveResponse(live=True)

    @answered
    async def ServerReady(self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext) -> Any:
        return pb.ServerReadyResponse(ready=await self._ready())

    @answered
    async def ModelReady(self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext) -> Any:
        await self._client(context, self._deadline(context))
        return pb.ModelReadyResponse(ready=await self._ready(request.name, request.version))

    @answered
    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext) -> Any:
        await self._client(context, self._deadline(context))
        return pb.ServerMetadataResponse(**inference.server_metadata(self.app))

    @answered
    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext) -> Any:
        await self._client(context, self._deadline(context))
        info = await inference.served(self.app.state.models, request.name, version=request.version)
        metadata = inference.model_metadata(info)
        del metadata["labels"]  # (no such field in the message: GET /model and REST's metadata have them)
        return pb.ModelMetadataResponse(**metadata)

    @answered
    async def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext) -> Any:
        deadline = self._deadline(context)
        client = await self._client(context, deadline)
        state = self.app.state
        info = await self.inference.model_named(state, request.model_name, deadline, request.model_version)
        body, binary = self._request(request)
        answer, cache = await self.inference.infer(state, info, body, binary, client, deadline)
        response = pb.ModelInferResponse(model_name=answer.model_name, model_version=answer.model_version, id=answer.id)
        for tensor in answer.outputs:
            response.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
            response.raw_output_contents.append(packed(tensor))
        context.set_trailing_metadata((("x-cache", cache.value),))
        return response

    def _deadline(self, context: grpc.aio.ServicerContext) -> Deadline:
        """The call's deadline, as it arrives: its own where that comes before the request timeout."""
        most_s, remaining = self.settings.request_timeout_s, context.time_remaining()
        return Deadline(most_s if remaining is None else min(remaining, most_s))

    async def _ready(self, name: str | None = None, version: str = "") -> bool:
        try:
            await inference.ready(self.app.state, name, version)
        except ServiceError:
            return False
        return True

    def _request(self, request: pb.ModelInferRequest) -> tuple[InferRequest, bytes | None]:
        """The request as plain fields, validated as REST's JSON is, and its input's binary contents
        (`raw_input_contents`, one per input where sent so)."""
        call = self.inference
        inputs = [
            {
                "name": tensor.name,
                "datatype": tensor.datatype,
                "shape": list(tensor.shape),
                "parameters": parameters(tensor.parameters),
                "data": call.decoded(list(tensor.contents.bytes_contents), ("inputs", i, "data")) or None,
            }
            for i, tensor in enumerate(request.inputs)
        ]
        outputs = [{"name": output.name, "parameters": parameters(output.parameters)} for output in request.outputs]
        fields = {"id": request.id or None, "parameters": parameters(request.parameters), "inputs": inputs}
        body = call.validated({**fields, "outputs": outputs or None})
        raw = request.raw_input_contents
        if len(raw) > len(body.inputs):
            raise call.invalid(("raw_input_contents",), "one per input, or none", len(raw))
        return body, raw[0] if raw else None

    async def _client(self, context: grpc.aio.ServicerContext, deadline: Deadline) -> str:
        """Who calls, as over HTTP (`api.access.check`, by `deadline`): the work's client, or its refusal."""
        if not self.checked:
            return DEFAULT_CLIENT
        # Every entry in order, as HTTP's headers: a key sent twice is read as over HTTP, its first.
        metadata = [(k.encode(), v.encode()) for k, v in context.invocation_metadata() or () if isinstance(v, str)]
        presented = presented_key(Headers(raw=metadata))
        # The peer is a URI: `ipv4:10.0.0.1:port`, `ipv6:%5B::1%5D:port`.
        peer = unquote(context.peer()).rsplit(":", 1)[0].removeprefix("ipv4:").removeprefix("ipv6:")
        address = await self.forwarded.client(peer, metadata)
        client = await check(self.keys, getattr(self.app.state, "rate_limit", None), presented, address, deadline)
        if isinstance(client, Denied):
            raise ServiceError(client.error_type, client.message, client.retry_after_s)
        return client if self.keys else DEFAULT_CLIENT


def parameters(fields: Mapping[str, pb.InferParameter]) -> dict[str, Any] | None:
    """V2 parameters as plain values (one with no value set as None, which is invalid)."""
    plain = {
        key: getattr(value, kind) if (kind := value.WhichOneof("parameter_choice")) else tritons(value)
        for key, value in fields.items()
    }
    return plain or None


def tritons(parameter: pb.InferParameter) -> float | int | None:
    """The value of Triton's own choices, `double_param = 4` and `uint64_param = 5`, which KServe's
    message lacks: tritonclient sends a float parameter and `priority` so, and REST takes both; the
    last sent, as protobuf reads a oneof. None when there is neither."""
    value = None
    for field in UnknownFieldSet(parameter):
        if (field.field_number, field.wire_type) == (4, 1):  # double: 64 bits, fixed
            value = struct.unpack("<d", struct.pack("<Q", field.data))[0]
        elif (field.field_number, field.wire_type) == (5, 0):  # uint64: a varint
            value = field.data
    return value
