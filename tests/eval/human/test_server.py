"""The served study over real HTTP: access control, CSRF, validation, blinding, and 20 raters voting at once."""

from __future__ import annotations

import random
import re
import sqlite3
import ssl
import subprocess
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict

import httpx
import pytest

from alpacare_jax.eval.human.results import study_results
from alpacare_jax.eval.human.study import create_study
from tests.eval.human.study_fixtures import (
    STYLES,
    login_nonce,
    served,
    sign_in,
    style_marker,
    tokens,
    write_outputs,
)

# The files' and models' names differ, so the blinding check covers both.
MODELS = {"finetuned_run7": "alpacare-secret-model", "baseline_dir": "baseline-secret-model"}
pytestmark = pytest.mark.xdist_group("human_eval_server")  # one worker starts each study server, once


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    files = [write_outputs(root / d / f"{d}_answers.json", m, 8, style=s, xss_every=3)
             for (d, m), s in zip(MODELS.items(), STYLES)]
    db_path = root / "study.sqlite"
    create_study(files, db_path, seed=0, raters=2)
    with served(db_path) as url:
        yield url, db_path, tokens(db_path)


def _login(url: str, token: str) -> httpx.Client:
    client = httpx.Client(base_url=url, timeout=60)
    assert sign_in(client, token).status_code == 303
    return client


def _assignments(db_path, rater: int) -> list[int]:
    with sqlite3.connect(db_path) as conn:
        return [a for (a,) in conn.execute("SELECT id FROM assignments WHERE rater_id = ? ORDER BY position", (rater,))]


def _csrf(html: str) -> str:
    return re.search(r'name="csrf_token" value="([0-9a-f]+)"', html).group(1)


def _votes(db_path) -> int:
    with sqlite3.connect(db_path) as conn:
        return conn.execute("SELECT COUNT(*) FROM votes").fetchone()[0]


def test_a_rater_gets_403_on_other_raters_data_and_the_admin_pages(study):
    url, db_path, tok = study
    before = _votes(db_path)
    me, other = _login(url, tok.raters[0]), _login(url, tok.raters[1])
    theirs = _assignments(db_path, 1)[0]
    mine = _assignments(db_path, 0)[0]
    csrf = _csrf(me.get(f"/rate/{mine}").text)
    assert me.get(f"/rate/{theirs}").status_code == 403
    vote = {"correctness": "A", "helpfulness": "A", "csrf_token": csrf}
    assert me.post(f"/rate/{theirs}", data=vote).status_code == 403
    for page in ("/admin", "/admin/results.json", "/admin/votes.csv", "/admin/chart.png"):
        assert me.get(page).status_code == 403, page
        assert other.get(page).status_code == 403, page
    anonymous = httpx.Client(base_url=url)
    for page in ("/", "/rate", f"/rate/{mine}", "/done", "/admin", "/admin/results.json"):
        assert anonymous.get(page).status_code == 403, page
    assert anonymous.get("/login/not-a-token").status_code == 403
    assert anonymous.get(f"/login/{tok.raters[0]}x").status_code == 403
    nonce = login_nonce(anonymous.get(f"/login/{tok.raters[0]}").text)
    assert anonymous.post("/login", data={"token": "not-a-token", "login_nonce": nonce}).status_code == 403
    admin = _login(url, tok.admin)
    assert admin.get("/admin").status_code == 200 and admin.get("/rate").status_code == 403
    assert _votes(db_path) == before


def _set_cookies(response: httpx.Response) -> dict[str, str]:
    """The response's Set-Cookie headers by cookie name, lower-cased."""
    return {h.split("=", 1)[0]: h.lower() for h in response.headers.get_list("set-cookie")}


def test_signing_in_takes_the_invite_pages_post_and_cookies_are_httponly_samesite(study):
    url, _, tok = study
    victim, attacker = httpx.Client(base_url=url), httpx.Client(base_url=url)
    page = victim.get(f"/login/{tok.raters[0]}")
    assert page.status_code == 200 and "study_session" not in _set_cookies(page)  # opening the link signs no one in
    assert victim.get("/rate").status_code == 403
    nonce_cookie = _set_cookies(page)["study_login"]
    assert "httponly" in nonce_cookie and "samesite=strict" in nonce_cookie and "secure" not in nonce_cookie

    # Login CSRF: another site makes the victim's browser post the attacker's invite token. It cannot read the
    # victim's nonce, and its own page's nonce does not match the victim's cookie (or there is no cookie).
    attacker_nonce = login_nonce(attacker.get(f"/login/{tok.raters[1]}").text)
    for client, nonce in [(victim, attacker_nonce), (victim, ""), (httpx.Client(base_url=url), attacker_nonce)]:
        forged = client.post("/login", data={"token": tok.raters[1], "login_nonce": nonce})
        assert forged.status_code == 403 and "study_session" not in _set_cookies(forged)
    assert victim.get("/rate").status_code == 403

    signed_in = victim.post("/login", data={"token": tok.raters[0], "login_nonce": login_nonce(page.text)})
    assert signed_in.status_code == 303 and signed_in.headers["location"] == "/rate"
    session = _set_cookies(signed_in)["study_session"]
    assert "httponly" in session and "samesite=lax" in session and "path=/" in session and "secure" not in session
    assert "max-age=0" in _set_cookies(signed_in)["study_login"]  # the nonce is spent
    assert victim.get("/rate").status_code == 303

    # Behind an HTTPS proxy (it says so in X-Forwarded-Proto) both cookies are Secure.
    https = {"X-Forwarded-Proto": "https"}
    page = httpx.get(f"{url}/login/{tok.raters[0]}", headers=https)
    assert "secure" in _set_cookies(page)["study_login"]
    nonce = login_nonce(page.text)
    signed_in = httpx.post(f"{url}/login", data={"token": tok.raters[0], "login_nonce": nonce},
                           headers={**https, "Cookie": f"study_login={nonce}"})
    assert signed_in.status_code == 303 and "secure" in _set_cookies(signed_in)["study_session"]


def test_served_over_https_the_session_cookie_is_secure(study, tmp_path):
    _, db_path, tok = study
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    with served(db_path, "--ssl_certfile", str(cert), "--ssl_keyfile", str(key)) as https_url:
        assert https_url.startswith("https://")
        with httpx.Client(base_url=https_url, verify=ssl.create_default_context(cafile=cert)) as client:
            signed_in = sign_in(client, tok.raters[1])
            assert signed_in.status_code == 303
            session = _set_cookies(signed_in)["study_session"]
            assert "secure" in session and "httponly" in session and "samesite=lax" in session
            assert client.get("/rate").status_code == 303  # the cookie comes back over HTTPS


def test_forms_need_the_csrf_token_and_votes_are_validated(study):
    url, db_path, tok = study
    me, other = _login(url, tok.raters[1]), _login(url, tok.raters[0])  # rater 0 votes in the blinding test
    mine = _assignments(db_path, 1)[1]

    def stored():
        with sqlite3.connect(db_path) as conn:
            return conn.execute("SELECT correctness, helpfulness, comment FROM votes WHERE assignment_id = ?",
                                (mine,)).fetchall()

    page = me.get(f"/rate/{mine}")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    theirs_csrf = _csrf(other.get(f"/rate/{_assignments(db_path, 0)[0]}").text)
    vote = {"correctness": "A", "helpfulness": "tie", "comment": "fine"}
    assert stored() == []
    for bad in ({}, {"csrf_token": "0" * 64}, {"csrf_token": theirs_csrf}, {"csrf_token": "ü"}):
        assert me.post(f"/rate/{mine}", data={**vote, **bad}).status_code == 403, bad
    csrf = _csrf(page.text)
    for bad in ({"correctness": "C"}, {"helpfulness": ""}, {"correctness": "model_1"}, {"comment": "x" * 4001}):
        response = me.post(f"/rate/{mine}", data={**vote, "csrf_token": csrf, **bad})
        assert response.status_code == 400 and 'role="alert"' in response.text, bad
    assert stored() == []
    saved = me.post(f"/rate/{mine}", data={**vote, "csrf_token": csrf})
    assert saved.status_code == 303
    assert stored() == [("A", "tie", "fine")]


def test_nothing_a_rater_receives_names_a_model_or_a_file(study):
    url, db_path, tok = study
    me = _login(url, tok.raters[0])
    csrf = _csrf(me.get("/rate", follow_redirects=True).text)
    received = []
    for aid in _assignments(db_path, 0):
        received.append(me.get(f"/rate/{aid}"))
        received.append(me.post(f"/rate/{aid}", data={"correctness": "B", "helpfulness": "A", "csrf_token": csrf}))
    received += [me.get(p) for p in ("/", "/rate", "/done", "/admin", "/admin/results.json", "/static/keys.js",
                                     "/static/style.css", f"/rate/{_assignments(db_path, 1)[0]}", "/rate/99999")]
    forbidden = [*MODELS, *MODELS.values(), "_answers", ".json", "secret-model"]
    for response in received:
        text = response.text + " ".join(f"{k}: {v}" for k, v in response.headers.items())
        assert not [f for f in forbidden if f in text], (response.url, [f for f in forbidden if f in text])
    assert "All 8 items rated" in me.get("/done").text  # 8 tasks, one model pair, every rater rates all
    admin = _login(url, tok.admin)
    assert "alpacare-secret-model" in admin.get("/admin").text  # the admin does see them


@pytest.fixture(scope="module")
def styled_study(tmp_path_factory):
    """Two models, 12 tasks, both raters rate all 12 items; the first file's answers are in STYLES[0]."""
    root = tmp_path_factory.mktemp("styled")
    files = [write_outputs(root / f"{m}.json", m, 12, style=s) for m, s in zip(("model-one", "model-two"), STYLES)]
    db_path = root / "study.sqlite"
    create_study(files, db_path, seed=1, raters=2)
    with served(db_path) as url:
        yield url, db_path, tokens(db_path)


def _side_showing(html: str, style: str) -> str:
    """"A" or "B": the side of the rating page whose answer is written in `style`."""
    a, b = (re.search(rf'id="answer-{side}">(.*?)</div>', html, re.DOTALL).group(1) for side in "ab")
    marker = style_marker(style)
    assert (marker in a) != (marker in b), (a, b)
    return "A" if marker in a else "B"


def test_a_vote_counts_for_the_model_shown_on_the_chosen_side(styled_study):
    """A rater who always prefers model one's text for correctness and model two's for helpfulness, wherever
    each is shown: the results must give model one every correctness vote and model two every helpfulness vote.
    The rater picks both A and B, so a swap flag inverted when storing or when decoding fails this test."""
    url, db_path, tok = styled_study
    chosen = Counter()
    for token in tok.raters:
        client = _login(url, token)
        page = client.get("/rate", follow_redirects=True)
        while page.url.path != "/done":
            vote = {"correctness": _side_showing(page.text, STYLES[0]),
                    "helpfulness": _side_showing(page.text, STYLES[1])}
            chosen.update(vote.values())
            page = client.post(page.url.path, data={**vote, "csrf_token": _csrf(page.text)}, follow_redirects=True)
    assert chosen == {"A": 24, "B": 24}  # 12 items x 2 raters x 2 criteria; each rater sees half of them swapped

    exported = _login(url, tok.admin).get("/admin/results.json").json()
    for comparisons in ([asdict(c) for c in study_results(db_path).comparisons], exported["comparisons"]):
        by_criterion = {c["criterion"]: c for c in comparisons}
        assert by_criterion.keys() == {"correctness", "helpfulness"}
        for criterion, (wins, losses, preference) in {"correctness": (24, 0, 1.0), "helpfulness": (0, 24, 0.0)}.items():
            c = by_criterion[criterion]
            assert (c["model_1"], c["model_2"]) == ("model-one", "model-two")
            assert (c["wins"], c["ties"], c["losses"], c["preference"]) == (wins, 0, losses, preference), c
    assert len(exported["votes"]) == 24
    assert {(v["correctness"], v["helpfulness"]) for v in exported["votes"]} == {("model_1", "model_2")}


@pytest.fixture(scope="module")
def crowded_study(tmp_path_factory):
    root = tmp_path_factory.mktemp("crowd")
    files = [write_outputs(root / f"{m}.json", m, 500, style=s) for m, s in zip(("model-p", "model-q"), STYLES)]
    db_path = root / "study.sqlite"
    create_study(files, db_path, sample=500, seed=0, raters=20, overlap=2)  # 50 items per rater
    with served(db_path) as url:
        yield url, db_path, tokens(db_path)


def test_twenty_raters_voting_at_once_store_every_vote_exactly_once(crowded_study):
    url, db_path, tok = crowded_study
    start = threading.Barrier(20)

    def rater(r: int) -> dict[int, tuple[str, str, str]]:
        rng = random.Random(r)
        client = _login(url, tok.raters[r])
        aids = _assignments(db_path, r)
        csrf = _csrf(client.get(f"/rate/{aids[0]}").text)
        sent = {a: (rng.choice(["A", "tie", "B"]), rng.choice(["A", "tie", "B"]), f"rater {r} item {a}") for a in aids}
        start.wait()
        for a, (c, h, comment) in sent.items():
            response = client.post(f"/rate/{a}", data={"correctness": c, "helpfulness": h, "comment": comment,
                                                       "csrf_token": csrf})
            assert response.status_code == 303, response.text
        return sent

    with ThreadPoolExecutor(20) as pool:
        sent = {}
        for part in pool.map(rater, range(20)):
            sent.update(part)
    assert len(sent) == 1000
    with sqlite3.connect(db_path) as conn:
        stored = {a: (c, h, m) for a, c, h, m in conn.execute(
            "SELECT assignment_id, correctness, helpfulness, comment FROM votes")}
        assert conn.execute("SELECT MAX(revisions) FROM votes").fetchone()[0] == 0
    assert stored == sent
