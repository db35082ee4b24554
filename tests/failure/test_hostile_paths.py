"""10,000 distinct hostile paths (random segments, percent-encoding, unicode, dot segments,
encoded CRLF and NUL, very long paths, query strings): each gets the app's own answer, and
neither the /api/metrics series nor the span names grow with them."""

from __future__ import annotations

import json
import random
import re
import string
from urllib.parse import quote, unquote

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cfk_otel.testing import OtlpReceiver
from tests.conftest import RunningApp, free_port, uvicorn_command
from tests.failure.conftest import (
    RSS_BOUND_MIB,
    StartApp,
    app_rss,
    assert_served,
    figures,
    hammer,
    latency,
    otlp_env,
)

pytestmark = pytest.mark.timeout(90)

COUNT = 10_000
TICKET, CARD = "/api/tickets/{ticket_id}", "/orgs/{org}/cards/{card_id}"
ROUTES = {TICKET, CARD, "/hello", "unmatched"}
SPAN_NAMES = {"GET " + r for r in ROUTES - {"unmatched"}} | {"GET"}

# Printable ASCII a client may send raw in a request target (h11 takes any VCHAR), minus
# '/', '?', '#' and '%', which change what the path means; those come encoded below.
_RAW = "".join(c for c in string.printable[:94] if c not in "/?#%")
# Pieces that decode to something hostile, but never to '/'.
_TRICKS = (
    "..",
    "%2e%2e",
    "%0D%0ASet-Cookie:%20stolen=1",
    "%0d%0a%0d%0aHTTP%201.1%20200%20OK",
    "%00",
    "%25",
    "%ZZ",
    "%G",
    "%C0%AF",  # overlong UTF-8 for '/'
    "%FF%FE",
    "%E2%80%AE",  # right-to-left override
    "<script>alert(1)<\\script>",
    "${jndi:ldap:x}",
    "'\"`\\",
    "%2e%2e%5c%2e%2e%5cwindows",
)
_UNICODE = "äöüßéñçøå€漢字日本語한국어العربيةעברית🙂🚀👩‍💻\u0301\u200b\ufeff"


def _segment(rng: random.Random, n: int, long: bool = False) -> str:
    """One path segment: never empty, never decoding to '/', unique thanks to ``n``."""
    pieces = [str(n)]
    for _ in range(rng.randint(1, 5)):
        kind = rng.random()
        if kind < 0.35:
            pieces.append("".join(rng.choices(_RAW, k=rng.randint(1, 12))))
        elif kind < 0.65:
            pieces.append(quote("".join(rng.choices(_UNICODE, k=rng.randint(1, 6))), safe=""))
        else:
            pieces.append(rng.choice(_TRICKS))
    if long:
        pieces.append("L" * rng.randint(2000, 4000))
    return "".join(pieces)


def _query(rng: random.Random) -> str:
    pairs = []
    for _ in range(rng.randint(1, 6)):
        key = rng.choice(["q", "a", "a", "redirect", "%0D%0Ax", "", "id[]", quote("ключ")])
        value = _segment(rng, rng.randint(0, 99), long=rng.random() < 0.02).replace("#", "%23")
        pairs.append(f"{key}={value}")
    return "&".join(pairs)


def hostile_paths(seed: int = 20260109) -> dict[str, int]:
    """10,000 distinct request targets and the status the app itself answers each with."""
    rng = random.Random(seed)
    out: dict[str, int] = {}
    while len(out) < COUNT:
        n = len(out)
        seg = _segment(rng, n, long=rng.random() < 0.03)
        family = n % 11
        if family == 0:
            path, status = f"/api/tickets/{seg}", 200
        elif family == 1:
            path, status = f"/api/tickets/{seg}?{_query(rng)}", 200
        elif family == 2:
            path, status = f"/hello?{_query(rng)}", 200
        elif family == 3:
            card = _segment(rng, n)
            # Starlette's Mount matches the rest of the path with ".*", which stops at a newline.
            path, status = f"/orgs/{seg}/cards/{card}", 404 if "\n" in unquote(card) else 200
        elif family == 4:  # several random segments, matching no route
            depth = rng.randint(1, 6)
            path, status = "/x-" + "/".join(_segment(rng, n + i) for i in range(depth)), 404
        elif family == 5:  # an encoded slash is a slash once decoded: no route has two segments here
            path, status = f"/api/tickets/{seg}%2F{_segment(rng, n)}", 404
        elif family == 6:  # dot segments are not resolved by the server, so they match nothing
            path, status = f"/api/tickets/../../{'../' * rng.randint(0, 8)}etc/passwd-{n}", 404
        elif family == 7:  # inside the /api/v1 mount, matching none of its routes
            path, status = f"/api/v1/{seg}", 404
        elif family == 8:
            path, status = f"//{seg}//{n}", 404
        elif family == 9:  # Starlette redirects a trailing slash to the route without it
            path, status = f"/api/tickets/{seg}/", 307
        else:
            path, status = f"/hello/{seg}?{_query(rng)}", 404
        out[path] = status
    return out


def series(text: str) -> set[tuple[str, frozenset[tuple[str, str]]]]:
    return {
        (s.name, frozenset(s.labels.items()))
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def scrape(app: RunningApp) -> str:
    status, _, body = app.get("/api/metrics")
    assert status == 200
    return body.decode()


def test_hostile_paths_get_the_apps_answer_and_bounded_telemetry(
    run_app: StartApp, receiver: OtlpReceiver
) -> None:
    paths = hostile_paths()
    assert len(paths) == COUNT
    port = free_port()
    env = otlp_env(receiver.http_endpoint, "http/protobuf")
    app = run_app(uvicorn_command("starlette_app:app", port), env, port)

    # One of each family first: every series the app will ever have for this traffic.
    warm = hammer(app.port, list(paths)[:110] * 3)
    assert_served(warm, paths.__getitem__)
    known = series(scrape(app))
    before = app_rss(app)

    replies = hammer(app.port, list(paths))
    after = app_rss(app)
    text = scrape(app)
    assert_served(replies, paths.__getitem__)

    new = series(text) - known
    assert not new, f"{len(new)} new series, e.g. {sorted(new, key=str)[:5]}"
    requests_total = [s for s in series(text) if s[0] == "http_requests_total"]
    labels = {dict(s[1])["path"] for s in requests_total}
    assert labels <= ROUTES, labels
    assert len(requests_total) <= 2 * len(ROUTES), requests_total  # method GET x template x status

    assert receiver.wait_for(lambda: len(receiver.spans) >= COUNT // 2, timeout=30)
    names = {s.name for s in receiver.iter_spans()}
    assert names <= SPAN_NAMES, names - SPAN_NAMES

    exited_in = app.terminate()
    lines = [json.loads(x) for x in app.output().splitlines() if x.startswith("{")]
    request_lines = [x for x in lines if x.get("logger") is None and "route" in x]
    routes = {x["route"] for x in request_lines}
    assert routes <= ROUTES, routes
    figures(
        "hostile-paths",
        requests=len(replies),
        series_http_requests_total=len(requests_total),
        span_names=len(names),
        spans_received=len(receiver.spans),
        request_lines=len(request_lines),
        rss_before_mib=before,
        rss_after_mib=after,
        shutdown_s=exited_in,
        **latency(replies),
    )
    # One JSON line each, all parseable (and one for the launcher's readiness probe).
    assert len(request_lines) == 1 + len(warm) + len(replies)
    assert after - before < RSS_BOUND_MIB


# A request target that decodes to a second log line, as found from outside (issue 20).
FORGED = "/api/tickets/7%0A12:00:00.000%20ERROR%20forged%20line%20admin%20logged%20in"
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_PRETTY_LINE = re.compile(r"\d\d:\d\d:\d\d\.\d{3} (DEBUG|INFO |WARN |ERROR|FATAL) ")


def test_pretty_output_cannot_be_forged_by_a_path(run_app: StartApp) -> None:
    """LOG_FORMAT=pretty: every line the app writes is one record's head or an indented stack
    line, whatever the paths; control characters come out escaped, and a file gets no colour."""
    controls = {path: status for path, status in hostile_paths().items() if _CONTROL.search(unquote(path))}
    assert len(controls) > 300  # encoded CR, LF and NUL from the tricks above
    extra = {
        FORGED: 200,
        "/api/tickets/8%0D%0A%1B[31mERROR%20red%1B[0m%C2%85NEL%E2%80%A8LS%07%7F": 200,
        "/x-%0A%0D%09%00": 404,
        "/boom": 500,  # an exception's stack in pretty form
    }
    port = free_port()
    app = run_app(
        uvicorn_command("starlette_app:app", port), {"LOG_FORMAT": "pretty", "LOG_OUTPUT": "stdout"}, port
    )
    replies = hammer(app.port, [*controls, *extra])
    assert_served(replies, {**controls, **extra}.__getitem__)
    app.terminate()
    output = app.output()
    lines = [x for x in output.split("\n") if x and not x.startswith("lifespan:")]
    heads = [x for x in lines if not x.startswith("  | ")]
    assert all(_PRETTY_LINE.match(x) for x in heads), [x for x in heads if not _PRETTY_LINE.match(x)][:5]
    # One request line per request (and the launcher's probe); no line starts with forged text.
    assert sum(" GET /" in x for x in heads) >= len(replies) + 1
    assert not any(x.startswith("12:00:00.000") for x in lines)
    for char in "\r\x1b\x00\x07\x7f\x85\u2028":
        assert char not in output, repr(char)
    [forged] = [x for x in heads if "forged line" in x and " GET " in x]
    assert "GET /api/tickets/7\\n12:00:00.000 ERROR forged line admin logged in 200" in forged
    [app_line] = [x for x in heads if "ticket 7\\n12:00" in x]  # the app's own log call, escaped too
    assert "requested" in app_line
    assert any("RuntimeError: boom on purpose" in x for x in lines if x.startswith("  | "))
