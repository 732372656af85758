"""`docqa serve`: ask questions about one uploaded document (a PDF or an image file) now, on Ray Serve.

The HTTP ingress (FastAPI) checks the token and the limits, then runs the batch pipeline's own planning
and rendering stages on the upload (``document_pages``: in the render helper) and sends each page with its
questions to the AnswerModel deployment, which batches pages across requests. Answers come back as rows
with the fields of the output tables.
"""

import asyncio
import dataclasses
import datetime
import hmac
import os
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any

import yaml
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, SecretStr, TypeAdapter, ValidationError, create_model
from ray import serve
from ray.exceptions import RayTaskError

from actors.checkpoint import CheckpointInfo
from actors.serving import AnswerModel
from pipeline.config import ConfigError, JobConfig
from pipeline.config_loading import format_validation_error
from pipeline.fingerprints import config_fingerprint
from pipeline.images import ImageGeometry
from pipeline.planning import document_of_bytes
from pipeline.questions import QuestionList, QuestionTemplate
from pipeline.records import BBOX, DOCUMENT, ITEM_ENTRY, OUTPUT_SCHEMA, Page, Status
from pipeline.rendering import document_pages

TOKEN_ENV = "DOCQA_SERVE_TOKEN"
APPLICATION_NAME = "docqa"
FORM_OVERHEAD_BYTES = 64 * 1024  # a request may exceed serve.max_upload_bytes by the form's fields and boundaries
MAX_QUESTIONS_BYTES = 64 * 1024  # a request's questions field
RETRY_AFTER_S = 2  # what a 503 (every turn taken, the queue full) asks the client to wait
# Document-level failures that mean "too big" (413); every other failed document is unprocessable (422).
TOO_LARGE = {Status.FILE_TOO_LARGE.value, Status.TOO_MANY_PAGES.value}
QUESTION_LIST = TypeAdapter(QuestionList)
_PYTHON_TYPES = {
    "string": str,
    "int32": int,
    "int64": int,
    "double": float,
    "float": float,
    "bool": bool,
    "date32[day]": datetime.date,  # value_date, as an ISO date in JSON
    str(BBOX): dict[str, float],  # evidence_bbox: {"x0": …, "y0": …, "x1": …, "y1": …}
}
ItemEntry = create_model(  # a field of a record of a list or object answer
    "ItemEntry", **{field.name: (_PYTHON_TYPES[str(field.type)] | None, None) for field in ITEM_ENTRY}
)
_PYTHON_TYPES[str(OUTPUT_SCHEMA.field("items").type)] = list[ItemEntry]  # type: ignore[valid-type]
AnswerRow = create_model(  # the Parquet row, field for field
    "AnswerRow", **{field.name: (_PYTHON_TYPES[str(field.type)] | None, None) for field in OUTPUT_SCHEMA}
)


class AnswersResponse(BaseModel):
    request_id: str
    document: str
    num_pages: int
    answers: list[AnswerRow]  # type: ignore[valid-type]


class Failure(BaseModel):
    status: str
    error: str


UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": "the document: a PDF or an image (TIFF, PNG, JPEG ...)",
                        },
                        "questions": {
                            "type": "string",
                            "format": "binary",
                            "description": "YAML or JSON: a list of question templates, as in the job config",
                        },
                        "question_set": {"type": "string", "description": "a named set from serve.question_sets"},
                    },
                }
            }
        },
    }
}
FAILURES = {code: {"model": Failure} for code in (401, 413, 422, 503, 504)}


class RequestFailure(Exception):
    def __init__(self, code: int, status: str, error: str) -> None:
        super().__init__(error)
        self.code, self.status, self.error = code, status, error

    def response(self) -> JSONResponse:
        headers = {401: {"WWW-Authenticate": "Bearer"}, 503: {"Retry-After": str(RETRY_AFTER_S)}}.get(self.code)
        return JSONResponse({"status": self.status, "error": self.error}, status_code=self.code, headers=headers)


def serve_token(config: JobConfig) -> str:
    """The bearer token requests must carry: DOCQA_SERVE_TOKEN, else serve.token. The endpoint never runs open."""
    token = os.environ.get(TOKEN_ENV) or (config.serve.token.get_secret_value() if config.serve.token else "")
    if not token:
        raise ConfigError(f"the endpoint needs a bearer token: set {TOKEN_ENV} or serve.token in the config")
    return token


def parse_questions(text: str, limit: int) -> list[QuestionTemplate]:
    """Question templates from a request: YAML or JSON, a list or a mapping with a ``questions`` list; more
    than ``limit`` of them is refused before any is validated. (Run off the event loop: YAML is slow to parse.)"""
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise RequestFailure(422, "bad_request", f"questions are not valid YAML or JSON: {error}") from None
    if isinstance(loaded, dict) and set(loaded) == {"questions"}:
        loaded = loaded["questions"]
    if isinstance(loaded, list) and len(loaded) > limit:
        raise RequestFailure(422, "bad_request", f"{len(loaded)} questions, over serve.max_questions={limit}")
    try:
        return QUESTION_LIST.validate_python(loaded)
    except ValidationError as error:
        raise RequestFailure(
            422, "bad_request", format_validation_error(error, "invalid questions in the request", ("questions",))
        ) from None


async def read_body(request: Request, limit: int, allowed: str) -> bytes:
    """The request's body, counted as it arrives (a chunked upload has no Content-Length): past ``limit``
    bytes (``allowed`` says which setting that is), 413 without reading the rest."""
    declared = int(request.headers.get("content-length") or 0)
    if declared > limit:
        raise RequestFailure(413, Status.FILE_TOO_LARGE.value, f"request is {declared} bytes, over {allowed}")
    received = bytearray()
    async for chunk in request.stream():
        received += chunk
        if len(received) > limit:
            raise RequestFailure(413, Status.FILE_TOO_LARGE.value, f"request is over {limit} bytes: over {allowed}")
    return bytes(received)


def replayed(request: Request, body: bytes) -> Request:
    """A request whose body is ``body`` (already read and counted), for the form parser."""
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return Request(request.scope, receive)


api = FastAPI(
    docs_url=None,  # the schema only with the token: /openapi.json below
    redoc_url=None,
    openapi_url=None,
    title="docqa",
    version="1",
    description="Answers to questions about one document, page by page (Idefics2). Send the PDF or image as "
    "multipart `file`, "
    "with `questions` (YAML/JSON templates) or `question_set` (a named set from the config); without either, "
    "the config's questions are asked.",
)
bearer = HTTPBearer(auto_error=False, description=f"the token in {TOKEN_ENV} or serve.token")


@serve.deployment
@serve.ingress(api)
class AnswerAPI:
    """The HTTP ingress. At most ``serve.max_requests_in_flight`` requests are worked on at once, each with a
    render helper of its own (a thread of its own, pipeline/sandbox.py keeps one helper per thread), and at
    most ``serve.max_requests_queued`` wait for a turn; past that, 503 with Retry-After. Each request has
    ``serve.request_timeout_s`` in all: past it, 504, its model calls cancelled and its render stopped (the
    render's deadline is the request's)."""

    def __init__(self, config: JobConfig, geometry: ImageGeometry, model: Any) -> None:
        self.config = config
        self.geometry = geometry
        self.model = model
        self.token = config.serve.token.get_secret_value().encode() if config.serve.token else b""
        settings = config.serve
        self.turns = asyncio.Semaphore(settings.max_requests_in_flight)
        self.waiting = 0
        self.renderers = ThreadPoolExecutor(settings.max_requests_in_flight, thread_name_prefix="docqa-render")

    def _authorized(self, credentials: HTTPAuthorizationCredentials | None) -> None:
        if credentials is None or not hmac.compare_digest(credentials.credentials.encode(), self.token):
            raise RequestFailure(401, "unauthorized", "missing or wrong bearer token (Authorization: Bearer TOKEN)")

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/openapi.json", include_in_schema=False)
    async def openapi(self, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> Any:
        try:
            self._authorized(credentials)
        except RequestFailure as failure:
            return failure.response()
        return api.openapi()

    @api.post(
        "/v1/answers",
        response_model=AnswersResponse,
        responses=FAILURES,
        openapi_extra=UPLOAD_BODY,
        summary="Answer questions about every page of one document",
    )
    async def answers(
        self, request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
    ) -> Any:
        settings = self.config.serve
        try:
            self._authorized(credentials)
            if self.waiting >= settings.max_requests_queued and self.turns.locked():
                raise RequestFailure(
                    503,
                    "busy",
                    f"{settings.max_requests_in_flight} requests are being answered and "
                    f"{self.waiting} wait (serve.max_requests_queued); try again shortly",
                )
            deadline = time.monotonic() + settings.request_timeout_s
            self.waiting += 1
            try:
                await asyncio.wait_for(self.turns.acquire(), timeout=settings.request_timeout_s)
            except TimeoutError:
                raise RequestFailure(504, "timeout", "no turn came within serve.request_timeout_s") from None
            finally:
                self.waiting -= 1
            try:
                return await asyncio.wait_for(self._answer(request, deadline), max(deadline - time.monotonic(), 0))
            except TimeoutError:
                limit = f"serve.request_timeout_s={settings.request_timeout_s:g}"
                raise RequestFailure(504, "timeout", f"the request took longer than {limit}") from None
            finally:
                self.turns.release()
        except RequestFailure as failure:
            return failure.response()

    async def _answer(self, request: Request, deadline: float) -> AnswersResponse:
        limits = self.config.serve
        allowed = f"serve.max_upload_bytes={limits.max_upload_bytes}"
        form_allowed = f"{allowed} + {FORM_OVERHEAD_BYTES} for the form"
        body = await read_body(request, limits.max_upload_bytes + FORM_OVERHEAD_BYTES, form_allowed)
        form = await replayed(request, body).form(max_files=2, max_fields=4)
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise RequestFailure(422, "bad_request", "send the document as a multipart file field named 'file'")
        data = await upload.read(limits.max_upload_bytes + 1)
        if len(data) > limits.max_upload_bytes:
            raise RequestFailure(413, Status.FILE_TOO_LARGE.value, f"upload is {upload.size} bytes, over {allowed}")
        config = self._request_config(await self._questions(form), deadline)
        file_name = os.path.basename(upload.filename or "upload.pdf") or "upload.pdf"
        loop = asyncio.get_running_loop()
        pages = await loop.run_in_executor(self.renderers, self._render, config, file_name, data)
        if pages[0].scope == DOCUMENT:  # the document as a whole failed
            status, error = pages[0].status, pages[0].error or ""
            if status == Status.TOO_MANY_PAGES:
                error += f" (uploads are capped at serve.max_pages={limits.max_pages})"
            raise RequestFailure(413 if status in TOO_LARGE else 422, status, error)
        templates = {question.id: question for question in config.questions}
        request_id = f"serve-{secrets.token_hex(6)}"
        calls = [self.model.answer_page.remote((page, templates, request_id)) for page in pages]
        try:
            page_rows = await asyncio.gather(*calls)
        except asyncio.CancelledError:  # the request's deadline, or its client gone: free the model's slots
            for call in calls:
                call.cancel()
            raise
        fingerprint = config_fingerprint(config)
        rows = [
            {**dataclasses.asdict(row), "run_id": request_id, "config_fingerprint": fingerprint}
            for rows in page_rows
            for row in rows
        ]
        return AnswersResponse(
            request_id=request_id, document=file_name, num_pages=int(pages[0].num_pages or 0), answers=rows
        )

    async def _questions(self, form: Any) -> list[QuestionTemplate]:
        field, set_name = form.get("questions"), form.get("question_set")
        if field is not None and set_name is not None:
            raise RequestFailure(422, "bad_request", "send either questions or question_set, not both")
        if field is not None:
            raw = field.encode() if isinstance(field, str) else await field.read(MAX_QUESTIONS_BYTES + 1)
            if len(raw) > MAX_QUESTIONS_BYTES:
                raise RequestFailure(422, "bad_request", f"questions are over {MAX_QUESTIONS_BYTES} bytes")
            text = raw.decode("utf-8", "replace")
            return await asyncio.to_thread(parse_questions, text, self.config.serve.max_questions)
        if set_name is not None:
            sets = self.config.serve.question_sets
            if set_name not in sets:
                raise RequestFailure(422, "bad_request", f"no question set {set_name!r}; configured: {sorted(sets)}")
            return sets[set_name]
        return self.config.questions

    def _request_config(self, questions: list[QuestionTemplate], deadline: float) -> JobConfig:
        """The config of one request: its questions, its page cap, and its deadline as the render's."""
        limits = self.config.limits
        max_pages = min(limits.max_pages_per_document, self.config.serve.max_pages)
        timeout = max(min(limits.document_timeout_s, deadline - time.monotonic()), 0.001)
        update = {"max_pages_per_document": max_pages, "document_timeout_s": timeout}
        return self.config.model_copy(update={"questions": questions, "limits": limits.model_copy(update=update)})

    def _render(self, config: JobConfig, file_name: str, data: bytes) -> list[Page]:
        """The batch pipeline's planning and rendering stages, on one uploaded document, in this thread's own
        render helper."""
        return document_pages(config, self.geometry, document_of_bytes(file_name, data))


def build_app(config: JobConfig, checkpoint: CheckpointInfo) -> serve.Application:
    """The Serve application for ``config``: the ingress in front of an autoscaling pool of model replicas."""
    token = serve_token(config)
    settings, pool = config.serve, config.actors
    autoscaling = {
        "min_replicas": settings.min_replicas,
        "max_replicas": settings.max_replicas,
        "target_ongoing_requests": settings.target_ongoing_requests,
    }
    model = AnswerModel.options(
        autoscaling_config=autoscaling,
        max_ongoing_requests=max(2 * pool.batch_size, int(2 * settings.target_ongoing_requests)),
        ray_actor_options={"num_cpus": pool.num_cpus_per_actor, "num_gpus": pool.num_gpus_per_actor},
    ).bind(config, checkpoint)
    # The ingress renders with the same sandboxed stage as the batch pipeline; it reserves no CPU so that
    # model replicas are never starved of one on small machines.
    serving = settings.model_copy(update={"token": SecretStr(token)})
    # Serve hands the ingress what it holds and queues (503 past that), our own cap and queue decide (below).
    admitted = settings.max_requests_in_flight + settings.max_requests_queued
    return AnswerAPI.options(
        autoscaling_config=autoscaling,
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=admitted + 1,
        max_queued_requests=admitted,
    ).bind(config.model_copy(update={"serve": serving}), checkpoint.geometry, model)


def start_server(config: JobConfig) -> str:
    """Start (or update) the application on this Ray instance; returns its base URL."""
    from actors.families import inspect_checkpoint
    from jobs.cluster import check_gpus, check_render_helper, ensure_ray

    application = build_app(config, inspect_checkpoint(config.model, config.render))
    check_render_helper(config)  # this machine's: no Ray needed to refuse
    ensure_ray()
    check_gpus(config)
    address = f"{config.serve.host}:{config.serve.port}"
    try:
        serve.start(http_options={"host": config.serve.host, "port": config.serve.port})
        serve.run(application, name=APPLICATION_NAME, route_prefix="/", blocking=False)
    except RayTaskError as error:
        if "Failed to bind to address" not in str(error):
            raise
        serve.shutdown()  # or Serve's controller keeps starting proxies that fail the same way
        raise ConfigError(
            f"{address} is in use: Ray Serve's HTTP proxy could not bind it; stop what listens there or choose "
            "another port (--port, or serve.port)"
        ) from None
    return f"http://{address}"
