"""The study web app: blind A/B rating pages for raters, results and exports for the admin.

Who is who: an invite link ``/login/{token}`` shows a sign-in button; its POST stores the token in the session
cookie, and every later request is a rater's or the admin's by that cookie alone. A rater reaches only their
own assignments (any other answers 403, as do the admin pages); the admin reaches only the admin pages.

Signing in takes a POST so that another site cannot sign a browser in as someone else (login CSRF: a rater's
page or image pointing at ``/login/<the attacker's token>`` would otherwise file the victim's votes under the
attacker's rater). The form carries a fresh random nonce that must equal a SameSite=Strict cookie set with the
form, which a cross-site request neither knows nor carries.

Cookies are HttpOnly, SameSite and, when the request came over HTTPS (``serve --ssl_certfile``, or a proxy
saying ``X-Forwarded-Proto: https``), Secure. The session cookie is SameSite=Lax, not Strict, so a rater's
bookmark or link from an email opens their next item; every state change is a POST with a CSRF token anyway.

Blinding by construction: the rater pages are rendered from `RaterItem`, which holds the texts and the A/B
answers but no model or file. Model names reach only the admin pages.

Rating forms carry a CSRF token (an HMAC of the session token under the study's secret). Texts are rendered
escaped by Jinja2 (no Markdown, no HTML from answers), and the Content-Security-Policy allows only this site's
script file, so even a missed escape could not run a script.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import socket
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import jinja2
import uvicorn
from fastapi import FastAPI, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from . import db
from .chart import preference_chart
from .results import study_results
from .study import Invites, StudyError

HERE = Path(__file__).parent
COOKIE = "study_session"
LOGIN_COOKIE = "study_login"  # the sign-in form's nonce
SESSION_MAX_AGE = 180 * 24 * 3600  # a study runs for weeks; raters resume from the same browser
LOGIN_MAX_AGE = 3600
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                               "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",  # invite tokens appear in URLs: never pass them on
    "Cache-Control": "no-store",
}


def is_https(request: Request) -> bool:
    """Whether the browser reached us over HTTPS: directly, or through a proxy that says so.

    A client that fakes ``X-Forwarded-Proto`` only gets Secure cookies its browser will not send back over
    plain HTTP, so trusting the header costs nothing.
    """
    forwarded = request.headers.get("x-forwarded-proto", "").split(",")[0].strip().lower()
    return request.url.scheme == "https" or forwarded == "https"


def set_cookie(request: Request, response: Response, name: str, value: str, *, max_age: int, samesite: str) -> None:
    response.set_cookie(name, value, max_age=max_age, path="/", httponly=True, samesite=samesite,
                        secure=is_https(request))


@dataclass(frozen=True)
class Session:
    token: str
    rater_id: int | None  # None: the admin
    name: str


@dataclass(frozen=True)
class RaterItem:
    """What a rater sees of one assignment: no model, no file."""
    id: int
    position: int
    total: int
    done: int
    instruction: str
    input: str
    answer_a: str
    answer_b: str
    vote: dict | None
    previous: int | None
    next: int | None


def create_app(db_path: str | Path) -> FastAPI:
    db_path = Path(db_path)
    if not db_path.is_file():
        raise StudyError(f"{db_path}: no such study (make one with `alpacare-human-eval create`)")
    with db.opened(db_path) as conn:
        try:
            admin_token, secret = db.meta(conn, "admin_token"), db.meta(conn, "csrf_secret").encode()
        except sqlite3.DatabaseError as e:
            raise StudyError(f"{db_path}: not a study database ({e})") from None

    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    templates = Jinja2Templates(env=jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"),
                                                       autoescape=True))

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        response = await call_next(request)
        response.headers.update(SECURITY_HEADERS)
        return response

    def csrf_for(session: Session) -> str:
        return hmac.new(secret, b"csrf:" + session.token.encode(), hashlib.sha256).hexdigest()

    def holder(token: str) -> Session | None:
        """Whose token this is: the admin's, a rater's, or nobody's."""
        if not token:
            return None
        if hmac.compare_digest(token.encode(), admin_token.encode()):
            return Session(token, None, "admin")
        with db.opened(db_path) as conn:
            row = conn.execute("SELECT id, name FROM raters WHERE token = ?", (token,)).fetchone()
        return Session(token, row["id"], row["name"]) if row else None

    def session(request: Request) -> Session | None:
        return holder(request.cookies.get(COOKIE, ""))

    def invited(token: str) -> Session:
        s = holder(token)
        if s is None:
            raise HTTPException(403, "This invite link is not valid for this study.")
        return s

    def rater(request: Request) -> Session:
        s = session(request)
        if s is None or s.rater_id is None:
            raise HTTPException(403, "Open the invite link you were given to rate.")
        return s

    def admin(request: Request) -> Session:
        s = session(request)
        if s is None or s.rater_id is not None:
            raise HTTPException(403, "Only the study's admin may see this page.")
        return s

    def next_unrated(conn, rater_id: int, after: int = 0) -> int | None:
        """The first unrated assignment after position `after`, wrapping around to the start."""
        row = conn.execute("""
            SELECT a.id FROM assignments a LEFT JOIN votes v ON v.assignment_id = a.id
            WHERE a.rater_id = ? AND v.assignment_id IS NULL
            ORDER BY a.position <= ?, a.position LIMIT 1""", (rater_id, after)).fetchone()
        return row["id"] if row else None

    def rater_item(conn, s: Session, assignment_id: int) -> RaterItem:
        row = conn.execute("""
            SELECT a.id, a.rater_id, a.position, a.model_1_is_a, t.instruction, t.input,
                   x1.output AS output_1, x2.output AS output_2,
                   v.correctness, v.helpfulness, v.comment
            FROM assignments a JOIN items i ON i.id = a.item_id JOIN tasks t ON t.id = i.task_id
            JOIN answers x1 ON x1.task_id = i.task_id AND x1.model_id = i.model_1
            JOIN answers x2 ON x2.task_id = i.task_id AND x2.model_id = i.model_2
            LEFT JOIN votes v ON v.assignment_id = a.id WHERE a.id = ?""", (assignment_id,)).fetchone()
        if row is None:
            raise HTTPException(404, "No such item.")
        if row["rater_id"] != s.rater_id:
            raise HTTPException(403, "This item belongs to another rater.")
        total, done = conn.execute("""
            SELECT COUNT(*), COUNT(v.assignment_id) FROM assignments a LEFT JOIN votes v ON v.assignment_id = a.id
            WHERE a.rater_id = ?""", (s.rater_id,)).fetchone()
        neighbours = dict(conn.execute("SELECT position, id FROM assignments WHERE rater_id = ? AND position IN (?, ?)",
                                       (s.rater_id, row["position"] - 1, row["position"] + 1)).fetchall())
        a, b = (row["output_1"], row["output_2"]) if row["model_1_is_a"] else (row["output_2"], row["output_1"])
        vote = ({c: row[c] for c in (*db.CRITERIA, "comment")} if row["correctness"] is not None else None)
        return RaterItem(id=row["id"], position=row["position"], total=total, done=done,
                         instruction=row["instruction"], input=row["input"], answer_a=a, answer_b=b, vote=vote,
                         previous=neighbours.get(row["position"] - 1), next=neighbours.get(row["position"] + 1))

    def rating_page(request: Request, s: Session, item: RaterItem, error: str = "", status: int = 200):
        return templates.TemplateResponse(request, "rate.html", {
            "item": item, "csrf": csrf_for(s), "criteria": db.CRITERIA, "error": error,
            "choices": [("A", "A is better"), ("tie", "Tie"), ("B", "B is better")]}, status_code=status)

    @app.exception_handler(HTTPException)
    async def error_page(request: Request, exc: HTTPException):
        return templates.TemplateResponse(request, "message.html", {"title": f"Error {exc.status_code}",
                                                                    "message": exc.detail}, status_code=exc.status_code)

    @app.get("/login/{token}", response_class=HTMLResponse)
    def login_form(request: Request, token: str):
        who = invited(token)
        nonce = secrets.token_urlsafe(16)
        if who.rater_id is None:
            text = {"heading": "Study results", "button": "Open the results",
                    "message": "This is the study's admin link: it shows the results and every rater's link."}
        else:
            text = {"heading": "Answer comparison", "button": "Start rating",
                    "message": f"You are signing in as {who.name}. Keep this link to yourself: it is your key."}
        response = templates.TemplateResponse(request, "login.html", {**text, "token": token, "nonce": nonce})
        set_cookie(request, response, LOGIN_COOKIE, nonce, max_age=LOGIN_MAX_AGE, samesite="strict")
        return response

    @app.post("/login")
    def login(request: Request, token: str = Form(""), login_nonce: str = Form("")):
        expected = request.cookies.get(LOGIN_COOKIE, "")
        if not (expected and hmac.compare_digest(login_nonce.encode(), expected.encode())):
            raise HTTPException(403, "Sign-in must start from your invite link: open it again.")
        who = invited(token)
        response = RedirectResponse("/admin" if who.rater_id is None else "/rate", status_code=303)
        set_cookie(request, response, COOKIE, token, max_age=SESSION_MAX_AGE, samesite="lax")
        response.delete_cookie(LOGIN_COOKIE, path="/", httponly=True, samesite="strict", secure=is_https(request))
        return response

    @app.get("/")
    def home(request: Request):
        s = session(request)
        if s is None:
            raise HTTPException(403, "Open the invite link you were given.")
        return RedirectResponse("/admin" if s.rater_id is None else "/rate", status_code=303)

    @app.get("/rate")
    def resume(request: Request):
        s = rater(request)
        with db.opened(db_path) as conn:
            target = next_unrated(conn, s.rater_id)
        return RedirectResponse(f"/rate/{target}" if target is not None else "/done", status_code=303)

    @app.get("/rate/{assignment_id}", response_class=HTMLResponse)
    def show(request: Request, assignment_id: int):
        s = rater(request)
        with db.opened(db_path) as conn:
            return rating_page(request, s, rater_item(conn, s, assignment_id))

    @app.post("/rate/{assignment_id}")
    def vote(request: Request, assignment_id: int, correctness: str = Form(""), helpfulness: str = Form(""),
             comment: str = Form(""), csrf_token: str = Form("")):
        s = rater(request)
        if not hmac.compare_digest(csrf_token.encode(), csrf_for(s).encode()):
            raise HTTPException(403, "The form's security token is missing or wrong: reload the page and retry.")
        with db.opened(db_path) as conn:
            item = rater_item(conn, s, assignment_id)
            given = {"correctness": correctness, "helpfulness": helpfulness}
            if bad := [c for c in db.CRITERIA if given[c] not in db.CHOICES]:
                return rating_page(request, s, item, f"Choose A, tie or B for {' and '.join(bad)}.", 400)
            if len(comment) > db.MAX_COMMENT_CHARS:
                too_long = f"The comment is longer than {db.MAX_COMMENT_CHARS} characters."
                return rating_page(request, s, item, too_long, 400)
            with db.transaction(conn):
                conn.execute("""
                    INSERT INTO votes (assignment_id, correctness, helpfulness, comment) VALUES (?, ?, ?, ?)
                    ON CONFLICT (assignment_id) DO UPDATE SET correctness = excluded.correctness,
                      helpfulness = excluded.helpfulness, comment = excluded.comment,
                      updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now'), revisions = revisions + 1""",
                             (assignment_id, correctness, helpfulness, comment.strip()))
            target = next_unrated(conn, s.rater_id, after=item.position)
        return RedirectResponse(f"/rate/{target}" if target is not None else "/done", status_code=303)

    @app.get("/done", response_class=HTMLResponse)
    def done(request: Request):
        s = rater(request)
        with db.opened(db_path) as conn:
            rows = conn.execute("""
                SELECT a.id, a.position, v.assignment_id IS NOT NULL AS rated FROM assignments a
                LEFT JOIN votes v ON v.assignment_id = a.id WHERE a.rater_id = ? ORDER BY a.position""",
                                (s.rater_id,)).fetchall()
        return templates.TemplateResponse(request, "done.html", {"rows": rows, "done": sum(r["rated"] for r in rows)})

    @app.get("/admin", response_class=HTMLResponse)
    def admin_page(request: Request):
        admin(request)
        with db.opened(db_path) as conn:
            raters = {r["name"]: r["token"] for r in conn.execute("SELECT name, token FROM raters ORDER BY id")}
        links = dict(Invites(admin_token, raters).links(str(request.base_url)))
        return templates.TemplateResponse(request, "admin.html", {"results": study_results(db_path), "links": links})

    @app.get("/admin/results.json")
    def export_json(request: Request):
        admin(request)
        return Response(study_results(db_path).to_json(), media_type="application/json",
                        headers={"Content-Disposition": 'attachment; filename="results.json"'})

    @app.get("/admin/votes.csv")
    def export_csv(request: Request):
        admin(request)
        return Response(study_results(db_path).votes_csv(), media_type="text/csv; charset=utf-8",
                        headers={"Content-Disposition": 'attachment; filename="votes.csv"'})

    @app.get("/admin/chart.png")
    def chart(request: Request):
        admin(request)
        return Response(preference_chart(study_results(db_path).comparisons), media_type="image/png")

    return app


def serve(db_path: str | Path, *, host: str = "127.0.0.1", port: int = 8000, ssl_certfile: str | None = None,
          ssl_keyfile: str | None = None) -> None:
    """Serve a study until interrupted, over HTTPS when given a certificate and its key.

    The socket is bound first, so port 0 prints the port actually used.
    """
    if bool(ssl_certfile) != bool(ssl_keyfile):
        raise StudyError("HTTPS needs both --ssl_certfile and --ssl_keyfile")
    app = create_app(db_path)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)  # connections made from here on wait in the backlog until uvicorn accepts them
    bound_host, bound_port = sock.getsockname()[:2]
    scheme = "https" if ssl_certfile else "http"
    print(f"serving study {db_path} at {scheme}://{bound_host}:{bound_port}/", flush=True)
    config = uvicorn.Config(app, log_level="warning", ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile)
    uvicorn.Server(config).run(sockets=[sock])
