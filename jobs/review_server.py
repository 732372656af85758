"""``docqa review``: the review page and its JSON API over one output (FastAPI on uvicorn, one process).

The page (jobs/review.html) shows the queue one answer at a time: the page image with the evidence box,
the question, the answer, its typed value and confidence, and why it waits; a person accepts, corrects or
rejects it with the keyboard. Access needs the token (``DOCQA_REVIEW_TOKEN``): the login form turns it
into an HttpOnly, SameSite=Strict session cookie; the API also takes ``Authorization: Bearer TOKEN``.
Page images are rendered on demand from the source document in the render helper (pipeline/sandbox.py:
the document's bytes are parsed nowhere else) and cached. No path travels in a URL: an image is asked for
by a queue entry's id, and an id the queue never listed is 404.
"""

from __future__ import annotations

import hmac
import io
import os
import secrets
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Form, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from pydantic import BaseModel, Field

from jobs.reviews import DEFAULT_BELOW, QueueEntry, ReviewBook, value_text
from pipeline.config import ConfigError, LimitsConfig, RenderConfig, StorageConfig
from pipeline.records import DocumentError
from pipeline.sandbox import open_document
from pipeline.storage import read_object

TOKEN_ENV = "DOCQA_REVIEW_TOKEN"
COOKIE = "docqa_review"
PAGE_EDGE = 1600  # the longest edge of a page image, in pixels
CACHED_PAGES = 64
PAGE_HTML = Path(__file__).with_name("review.html")
LOGIN_HTML = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>docqa review: sign in</title>
<style>body{font:16px system-ui,sans-serif;margin:15vh auto;max-width:24rem}input,button{font:inherit;
padding:.4rem;width:100%;margin:.3rem 0;box-sizing:border-box}.error{color:#b00020}</style></head><body>
<h1>docqa review</h1><form method="post" action="/login"><label>Token <input id="token" name="token"
type="password" autofocus required></label><label>Your name <input id="reviewer" name="reviewer"
maxlength="80"></label><button id="sign-in" type="submit">Sign in</button></form>{error}</body></html>"""


def review_token() -> str:
    token = os.environ.get(TOKEN_ENV, "")
    if not token:
        raise ConfigError(f"the review page needs a token: set {TOKEN_ENV} (the login form and the API ask for it)")
    return token


class Decision(BaseModel):
    """A reviewer's decision on one queue entry."""

    id: str = Field(description="the queue entry's id")
    decision: str = Field(description="accept, correct or reject")
    answer: str | None = Field(None, max_length=10_000, description="with correct: the right answer")
    reviewer: str | None = Field(None, max_length=80, description="who decided (the API; the page sends its login)")


class PageImages:
    """Page images rendered from the source documents in this process's render helper, the latest
    ``CACHED_PAGES`` kept. One render at a time (one helper)."""

    def __init__(self, storage: StorageConfig) -> None:
        self.storage, self.render, self.limits = storage, RenderConfig(), LimitsConfig()
        self.cache: OrderedDict[tuple[str, int, str | None], bytes] = OrderedDict()
        self.lock = threading.Lock()

    def png(self, document: str, page_number: int, version: str | None = None) -> bytes:
        """The page as PNG; ``version`` (the document's source_version) keys the cache, so a replaced
        file is rendered anew."""
        from PIL import Image

        key = (document, page_number, version)
        with self.lock:
            if key in self.cache:
                self.cache.move_to_end(key)
                return self.cache[key]
            data = read_object(document, self.storage, self.limits.max_file_bytes).data
            if not data:
                raise DocumentError("file_too_large", f"{document} is over limits.max_file_bytes")
            opened = open_document(data, self.render, self.limits)
            try:
                pixels = opened.render(page_number, PAGE_EDGE)
            finally:
                opened.close()
            out = io.BytesIO()
            Image.fromarray(pixels).save(out, "PNG", optimize=False, compress_level=3)
            self.cache[key] = out.getvalue()
            if len(self.cache) > CACHED_PAGES:
                self.cache.popitem(last=False)
            return self.cache[key]


class Unauthorized(Exception):
    pass


class NotFound(Exception):
    pass


def reviewer_of(request: Request) -> str | None:
    """The signed-in reviewer (session cookie), or "api" (bearer token), or None."""
    sessions, token = request.app.state.sessions, request.app.state.token
    cookie = request.cookies.get(COOKIE)
    if cookie and cookie in sessions:
        return sessions[cookie]
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and hmac.compare_digest(credentials.strip().encode(), token.encode()):
        return "api"
    return None


def signed_in(request: Request) -> str:
    """The dependency of every API route: the reviewer, or 401."""
    reviewer = reviewer_of(request)
    if reviewer is None:
        raise Unauthorized()
    return reviewer


Reviewer = Annotated[str, Depends(signed_in)]


def build_app(book: ReviewBook, token: str) -> FastAPI:
    """The page and the API over ``book``; ``token`` opens them."""
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None, title="docqa review")
    sessions: dict[str, str] = {}  # session cookie -> reviewer name
    app.state.token, app.state.sessions = token, sessions
    images = PageImages(book.storage)
    decide_lock = threading.Lock()

    @app.exception_handler(Unauthorized)
    async def unauthorized(request: Request, _: Exception) -> Response:
        return JSONResponse(
            {"error": "sign in on the page, or send Authorization: Bearer TOKEN"},
            status_code=401,
            headers={"WWW-Authenticate": "Bearer"},
        )

    @app.get("/", response_class=HTMLResponse)
    def page(request: Request) -> Response:
        if reviewer_of(request) is None:
            return HTMLResponse(LOGIN_HTML.replace("{error}", ""))
        return HTMLResponse(PAGE_HTML.read_text())

    @app.post("/login")
    def login(token_given: Annotated[str, Form(alias="token")], reviewer: Annotated[str, Form()] = "") -> Response:
        if not hmac.compare_digest(token_given.encode(), token.encode()):
            error = '<p class="error" id="error">Wrong token.</p>'
            return HTMLResponse(LOGIN_HTML.replace("{error}", error), status_code=401)
        session = secrets.token_urlsafe(32)
        sessions[session] = reviewer.strip()[:80] or "reviewer"
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(COOKIE, session, httponly=True, samesite="strict", path="/")
        return response

    @app.get("/api/queue")
    def queue(reviewer: Reviewer, limit: Annotated[int, Query(ge=1, le=1000)] = 50) -> dict[str, Any]:
        entries = book.queue(limit)
        return {"reviewer": reviewer, "items": [entry.as_json() for entry in entries]}

    def known(identity: str) -> QueueEntry:
        entry = book.entry(identity)
        if entry is None:
            raise NotFound()
        return entry

    @app.exception_handler(NotFound)
    async def not_found(request: Request, _: Exception) -> Response:
        return JSONResponse({"error": "no such queue entry"}, status_code=404)

    @app.get("/api/pages/{identity}")
    def page_image(identity: str, reviewer: Reviewer) -> Response:
        entry = known(identity)
        try:
            png = images.png(entry.document, entry.page_number, entry.source_version)
        except (DocumentError, OSError) as error:
            return JSONResponse({"error": f"the page cannot be shown: {error}"}, status_code=422)
        return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/api/parse")
    def parse(identity: Annotated[str, Query(alias="id")], answer: str, reviewer: Reviewer) -> dict[str, Any]:
        """How a correction would be read: its typed value, or why it is not one."""
        try:
            columns = book.typed(known(identity), answer)
        except ValueError as error:
            return {"value": None, "value_status": None, "error": str(error)}
        return {
            "value": value_text(columns),
            "value_status": columns.get("value_status"),
            "error": columns.get("error"),
        }

    @app.post("/api/reviews")
    def review(decision: Decision, reviewer: Reviewer) -> Response:
        entry = known(decision.id)
        try:
            with decide_lock:  # one process: the book's listing cache is not for two threads at once
                who = (decision.reviewer or reviewer) if reviewer == "api" else reviewer  # a session is its login
                row = book.decide(entry, decision.decision, decision.answer, who)
        except ValueError as error:
            return JSONResponse({"error": str(error)}, status_code=422)
        return JSONResponse({"review_id": row.review_id, "decision": row.decision, "answer": row.answer})

    return app


def serve_reviews(
    output: str,
    storage: StorageConfig | None = None,
    host: str = "127.0.0.1",
    port: int = 8500,
    below: float = DEFAULT_BELOW,
    thresholds: dict[str, float] | None = None,
) -> None:
    """Serve the review page of ``output`` until interrupted."""
    import uvicorn

    token = review_token()
    book = ReviewBook(output, storage, below, thresholds)
    print(f"docqa review: http://{host}:{port}/ ({len(book.queue())} answers to check in {output})", flush=True)
    uvicorn.run(build_app(book, token), host=host, port=port, log_level="warning")
