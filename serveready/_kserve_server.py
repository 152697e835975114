"""The KServe side of :mod:`serveready.kserve` (imports ``kserve``, which parses ``sys.argv`` at import).

Three pieces around KServe's own server: :class:`ArchiveModel` (a ``kserve.Model`` over an archive:
readiness, v2 metadata, and gRPC ``ModelInfer`` turned into the v2 binary body the handler reads),
:class:`InferenceRoutes` (ASGI, in front of KServe's FastAPI app: the HTTP inference routes get the
handler's own answer, plus the key and the size limit), and servers bound to the address asked
for (KServe binds HTTP to 0.0.0.0 and gRPC to ``[::]``).
"""

from __future__ import annotations

import json
import logging
import socket
import struct
from collections.abc import Mapping, Sequence
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import kserve
import numpy as np
from grpc import aio
from kserve import model_server
from kserve.errors import InferenceError, InvalidInput
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc
from kserve.protocol.grpc.interceptors import ExceptionToStatusInterceptor, LoggingInterceptor
from kserve.protocol.grpc.server import GRPCServer
from kserve.protocol.grpc.servicer import InferenceServicer
from kserve.protocol.infer_type import InferRequest
from kserve.protocol.rest.server import RESTServer
from prometheus_client import REGISTRY

import serveready

from . import hosting
from .handlers.archive import Archive

logger = logging.getLogger("serveready.kserve")

class ArchiveModel(kserve.Model):
    """One archive as a KServe model. HTTP inference never reaches KServe's decoding (see :class:`InferenceRoutes`);
    gRPC does, and is handed to the handler as the equivalent v2 binary request."""

    def __init__(self, name: str, path: Path, public_key: Path | None) -> None:
        super().__init__(name)
        self.path, self.public_key = path, public_key
        self.served: serveready.Model | None = None
        self.batcher: hosting.Batcher | None = None
        self._metadata: dict[str, Any] = {}

    def load(self) -> bool:
        device = "cuda" if Archive(self.path).device == "gpu" else "cpu"  # an archive built for a GPU asks for one
        self.served = serveready.load(self.path, device, public_key=self.public_key)
        self.batcher = hosting.Batcher(self.served, self.served.archive.batch_size)
        self._metadata = hosting.metadata(self.served)  # one sample request: warmed up, and the outputs are known
        hosting.log_runs_with(self.served, "KServe's model server")
        self.ready = True
        return True

    def get_input_types(self) -> list[dict[str, Any]]:
        return self._metadata.get("inputs", [])

    def get_output_types(self) -> list[dict[str, Any]]:
        return self._metadata.get("outputs", [])

    async def predict(self, payload: Any, headers: dict[str, str] | None = None) -> Any:
        if not isinstance(payload, InferRequest):
            raise InvalidInput("this server answers HTTP inference on its own routes; send v2 over gRPC here")
        body, header_length = grpc_body(payload)
        assert self.batcher is not None
        answer = await self.batcher.predict(body, "application/octet-stream", {"Inference-Header-Content-Length": str(header_length)})
        document = answer.json() if answer.content_type == "application/json" else {}
        if not answer.ok:
            message = document.get("error") or document.get("message") or answer.body.decode("utf-8", "replace")
            if 400 <= answer.status < 500:
                raise InvalidInput(message)
            raise InferenceError(message, status=str(answer.status))
        return grpc_answer(document, self.name, payload.id)

    def stop(self) -> None:
        if self.batcher is not None:
            self.batcher.close()


def grpc_body(request: InferRequest) -> tuple[bytes, int]:
    """The v2 binary-extension body (JSON header, then each input's bytes) that ``request`` amounts to."""
    inputs, raws = [], []
    for tensor in request.inputs:
        array = tensor.as_numpy()
        if tensor.datatype == "BYTES":
            raw = b"".join(struct.pack("<I", len(v)) + v for v in (x if isinstance(x, bytes) else str(x).encode() for x in array.flatten()))
        else:
            raw = np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
        inputs.append({"name": tensor.name, "shape": list(tensor.shape), "datatype": tensor.datatype, "parameters": {"binary_data_size": len(raw)}})
        raws.append(raw)
    header = json.dumps({"id": request.id, "inputs": inputs} if request.id else {"inputs": inputs}).encode()
    return header + b"".join(raws), len(header)


def grpc_answer(document: Mapping[str, Any], name: str, request_id: str | None) -> pb.ModelInferResponse:
    """The handler's v2 JSON answer as a gRPC response with its tensors as raw bytes (what tritonclient reads)."""
    outputs, raws = [], []
    for output in document.get("outputs", []):
        outputs.append(pb.ModelInferResponse.InferOutputTensor(name=output["name"], datatype=output["datatype"], shape=output["shape"]))
        raws.append(np.asarray(output["data"], dtype="<f4").tobytes())
    return pb.ModelInferResponse(model_name=name, model_version=str(document.get("model_version") or ""), id=request_id or "",
                                 outputs=outputs, raw_output_contents=raws)


class InferenceRoutes:
    """ASGI middleware in front of KServe's app: the inference routes answered by the archives' handlers with
    TorchServe's bodies; the key and the body limit for everything; the rest is KServe's."""

    def __init__(self, app: Any, models: Mapping[str, ArchiveModel], key: str | None, limit: int) -> None:
        self.app, self.models, self.key, self.limit = app, models, key, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        path = scope["path"]
        if not hosting.is_open(path) and not hosting.key_matches(headers, self.key):
            return await _send(send, hosting.unauthorized())
        if path == "/ping" and scope["method"] == "GET":
            ready = all(m.ready for m in self.models.values())
            body = json.dumps({"status": "Healthy" if ready else "Unhealthy"}, indent=2).encode() + b"\n"
            return await _send(send, hosting.Answer(200 if ready else 500, "application/json", body))
        found = hosting.route(path) if scope["method"] == "POST" else None
        if found is None:
            return await self.app(scope, receive, send)
        model = self.models.get(found.model)
        if model is None or model.batcher is None:
            return await _send(send, hosting.model_not_found(found.model))
        declared = headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.limit:
            return await _send(send, hosting.too_large(int(declared), self.limit))
        body = await _body(receive, self.limit)
        if body is None:
            return await _send(send, hosting.too_large(None, self.limit))
        content_type = headers.get("content-type")
        ask = model.batcher.explain if found.verb == hosting.EXPLAIN else model.batcher.predict
        return await _send(send, await ask(body, content_type, headers))


async def _body(receive: Any, limit: int) -> bytes | None:
    """The request body, or None once it passes ``limit`` bytes (a chunked body with no length)."""
    parts, size = [], 0
    while True:
        message = await receive()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        parts.append(chunk)
        if not message.get("more_body"):
            return b"".join(parts)


async def _send(send: Any, answer: hosting.Answer) -> None:
    headers = [(b"content-type", (answer.content_type or "application/octet-stream").encode()),
               (b"content-length", str(len(answer.body)).encode())]
    await send({"type": "http.response.start", "status": answer.status, "headers": headers})
    await send({"type": "http.response.body", "body": answer.body})


class _Bound:
    """What the servers listen on (KServe's own bind every interface), and the key gRPC calls must carry."""

    host = hosting.DEFAULT_HOST
    key: str | None = None
    http_fd: int | None = None  # under --workers N: the supervisor's listening socket, shared by every worker


class KeyInterceptor(aio.ServerInterceptor):
    """gRPC calls other than the health checks need the key in their ``authorization`` metadata, as TorchServe's
    gRPC APIs do (PERMISSION_DENIED otherwise)."""

    OPEN = ("/ServerLive", "/ServerReady", "/ModelReady")

    def __init__(self, key: str | None) -> None:
        self.key = key

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        if self.key is None or details.method.endswith(self.OPEN):
            return await continuation(details)
        metadata = {m.key: m.value for m in details.invocation_metadata or ()}
        if hosting.key_matches(metadata, self.key):
            return await continuation(details)
        message = json.loads(hosting.unauthorized().body)["message"]

        async def deny(request: Any, context: Any) -> None:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, message)

        return grpc.unary_unary_rpc_method_handler(deny)


class BoundRESTServer(RESTServer):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.config.host = _Bound.host

    async def start(self) -> None:
        self.create_application()
        sockets = None if _Bound.http_fd is None else [socket.socket(fileno=_Bound.http_fd)]
        await self._server.serve(sockets=sockets)


class BoundGRPCServer(GRPCServer):
    """KServe's gRPC server (its servicer and interceptors), on the address asked for, with the key checked."""

    async def start(self, max_workers: int) -> None:
        self._server = aio.server(
            futures.ThreadPoolExecutor(max_workers=max_workers),
            interceptors=(KeyInterceptor(_Bound.key), LoggingInterceptor(), ExceptionToStatusInterceptor()),
            options=[("grpc.max_send_message_length", self._kwargs.get("grpc_max_send_message_length")),
                     ("grpc.max_receive_message_length", self._kwargs.get("grpc_max_receive_message_length"))],
        )
        grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
            InferenceServicer(self._data_plane, self._model_repository_extension), self._server)
        host = _Bound.host
        address = f"[{host}]:{self._port}" if ":" in host else f"{host}:{self._port}"
        if self._server.add_insecure_port(address) == 0:
            raise RuntimeError(f"gRPC cannot listen on {address}")
        logger.info("gRPC on %s", address)
        await self._server.start()
        await self._server.wait_for_termination()


def serve(store: Path, names: Sequence[str], *, host: str, key: str | None, public_key: Path | None, limit: int, grpc: bool,
          http_fd: int | None = None) -> int:
    """Load every archive, then run KServe's server until it is stopped (SIGTERM/SIGINT)."""
    found = hosting.archives(store, names)
    models: dict[str, ArchiveModel] = {}
    for i, (name, path) in enumerate(found.items(), 1):
        logger.info("[%d/%d] loading %s", i, len(found), path)
        model = ArchiveModel(name, path, public_key)
        model.load()
        models[name] = model
    _Bound.host, _Bound.key, _Bound.http_fd = host, key, http_fd
    model_server.RESTServer = BoundRESTServer  # what ModelServer.start constructs
    model_server.GRPCServer = BoundGRPCServer
    model_server.app.add_middleware(InferenceRoutes, models=models, key=key, limit=limit)
    REGISTRY.register(hosting.MetricsCollector({n: m.served for n, m in models.items() if m.served is not None}))
    logger.info("serving %s on http://%s:%d%s", ", ".join(models), host, model_server.args.http_port,
                f" and gRPC {host}:{model_server.args.grpc_port}" if grpc else "")
    kserve.ModelServer(enable_grpc=grpc).start(list(models.values()))
    return 0


__all__ = ["ArchiveModel", "InferenceRoutes", "grpc_answer", "grpc_body", "serve"]
