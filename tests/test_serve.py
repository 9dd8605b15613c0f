"""`igpt serve`: the API through Starlette's test client (streams, refusals as 4xx with a message, never a
500), and the page end to end in headless Chromium driven by Selenium (Debian's chromium and chromedriver)."""

import io
import json
import select
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from igpt.cli import main

starlette = pytest.importorskip("starlette")
from starlette.testclient import TestClient  # noqa: E402

from igpt.serving import app as serve  # noqa: E402
from igpt.serving.app import Completer, create_app, is_loopback, make_server  # noqa: E402

LIMIT = 64 * 1024


@pytest.fixture(scope="module")
def client(micro_run):
    return TestClient(create_app(Completer(micro_run), LIMIT))


def png_bytes(size=(30, 20), colour=True) -> bytes:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 255, (size[1], size[0], 3) if colour else (size[1], size[0]), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def messages(resp) -> list[dict]:
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("application/x-ndjson")
    return [json.loads(line) for line in resp.text.splitlines() if line.strip()]


def test_page_and_info_are_local(client):
    page = client.get("/")
    assert page.status_code == 200 and "<form" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # no assets from the network
    info = client.get("/api/info").json()
    assert info["resolution"] == 8 and info["n_test"] == 359 and info["max_upload_bytes"] == LIMIT
    img = client.get("/api/test/3.png")
    assert img.status_code == 200 and img.content[:8] == b"\x89PNG\r\n\x1a\n"


def test_completion_of_a_test_image_streams_row_by_row(client):
    msgs = messages(
        client.post(
            "/api/complete",
            data={
                "source": "test",
                "index": "5",
                "keep_rows": "3",
                "num": "3",
                "temperature": "1",
                "seed": "1",
            },
        )
    )
    assert msgs[0]["original"].startswith("data:image/png;base64,") and msgs[0]["keep_rows"] == 3
    rows = [m["rows_done"] for m in msgs if "samples" in m]
    assert rows == [4, 5, 6, 7, 8]  # one message per sampled row
    assert all(len(m["samples"]) == 3 for m in msgs if "samples" in m)
    assert msgs[-1]["done"] and msgs[-1]["tokens"] == 3 * 5 * 8


def test_upload_is_resized_and_quantized_with_the_runs_palette(client):
    files = {"file": ("x.png", png_bytes(), "image/png")}
    msgs = messages(
        client.post("/api/complete", data={"source": "upload", "keep_rows": "8", "num": "2"}, files=files)
    )
    # keep_rows 8 of 8: nothing to sample, the samples are the quantized upload itself
    assert msgs[1]["rows_done"] == 8 and msgs[1]["samples"][0] == msgs[1]["samples"][1]


@pytest.mark.parametrize(
    "data, files, status, expect",
    [
        (
            {"source": "upload"},
            {"file": ("a.txt", b"hello, not an image", "text/plain")},
            415,
            "not an image",
        ),
        (
            {"source": "upload"},
            {"file": ("big.png", b"\x89PNG" + bytes(LIMIT + 10), "image/png")},
            413,
            "larger than",
        ),
        ({"source": "upload"}, None, 400, "no file"),
        ({"source": "test", "index": "359"}, None, 400, "index must be in [0, 358]"),
        ({"source": "test", "keep_rows": "9"}, None, 400, "keep_rows must be in [0, 8]"),
        ({"source": "test", "num": "0"}, None, 400, "num must be in [1, 16]"),
        ({"source": "test", "temperature": "-1"}, None, 400, "temperature must be in"),
        ({"source": "test", "temperature": "nan"}, None, 400, "temperature must be finite"),
        ({"source": "test", "seed": "abc"}, None, 400, "seed must be an integer"),
        ({"source": "camera"}, None, 400, "source must be test or upload"),
    ],
)
def test_refusals_are_4xx_with_a_message(client, data, files, status, expect):
    resp = client.post("/api/complete", data=data, files=files)
    assert resp.status_code == status and expect in resp.json()["error"]


def test_bad_test_image_path_is_4xx(client):
    assert client.get("/api/test/999.png").status_code == 400
    assert client.get("/api/test/abc.png").status_code == 400


def test_serve_refuses_a_busy_port(micro_run, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(SystemExit):
            main(["serve", str(micro_run), "--port", str(port)])
    assert "in use" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- real server
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")


def start_server(completer: Completer):
    """uvicorn on a free port in a daemon thread; returns (base URL, stop function)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = make_server(create_app(completer, LIMIT), "127.0.0.1", port)
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    for _ in range(200):
        if srv.started:
            break
        time.sleep(0.05)

    def stop() -> None:
        srv.should_exit = True
        t.join(10)

    return f"http://127.0.0.1:{port}", stop


@pytest.fixture(scope="module")
def server(micro_run):
    url, stop = start_server(Completer(micro_run))
    yield url
    stop()


class SlowCompleter(Completer):
    """Sleeps between streamed messages, standing in for a big model."""

    def stream(self, *args, **kw):
        for m in super().stream(*args, **kw):
            time.sleep(0.4)
            yield m


def test_a_slow_completion_does_not_hold_up_other_requests(micro_run):
    import httpx

    url, stop = start_server(SlowCompleter(micro_run))
    try:
        finished = {}

        def slow() -> None:
            r = httpx.post(url + "/api/complete", data={"source": "test", "keep_rows": "4"}, timeout=60)
            finished["slow"] = (time.perf_counter(), r.status_code)

        t = threading.Thread(target=slow)
        t.start()
        time.sleep(0.6)  # the slow stream is under way (6 messages x 0.4 s)
        t0 = time.perf_counter()
        info = httpx.get(url + "/api/info", timeout=10)
        answered = time.perf_counter()
        assert info.status_code == 200 and answered - t0 < 1.0
        t.join(60)
        assert finished["slow"][1] == 200 and finished["slow"][0] > answered  # answered while it streamed
    finally:
        stop()


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and DRIVER):
        pytest.skip(
            "needs Debian's chromium and chromium-driver (scripts/setup.sh --test installs them as root)"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1100,900",
    ):
        opts.add_argument(a)
    drv = webdriver.Chrome(service=Service(DRIVER), options=opts)
    yield drv
    drv.quit()


def test_page_in_a_real_browser_uploads_and_renders_completions(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    img = tmp_path / "mine.png"
    img.write_bytes(png_bytes(colour=False))
    browser.get(server + "/")
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: "test images" in d.find_element(By.ID, "about").text)
    browser.find_element(By.ID, "file").send_keys(str(img))
    browser.find_element(By.ID, "num").clear()
    browser.find_element(By.ID, "num").send_keys("3")
    browser.find_element(By.ID, "go").click()
    wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#result[data-done='1']")))
    samples = browser.find_elements(By.CSS_SELECTOR, "#result img[id^=sample]")
    assert len(samples) == 3
    # every sample is a decoded, non-empty image
    assert all(
        browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", s) > 0
        for s in samples
    )
    assert "done:" in browser.find_element(By.ID, "status").text
    assert browser.find_element(By.ID, "error").text == ""
    browser.save_screenshot(str(Path(tmp_path) / "page.png"))


def test_browser_shows_the_refusal_of_a_non_image(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    bad = tmp_path / "notes.png"
    bad.write_bytes(b"this is text with an image's name")
    browser.get(server + "/")
    WebDriverWait(browser, 60).until(lambda d: "test images" in d.find_element(By.ID, "about").text)
    browser.find_element(By.ID, "file").send_keys(str(bad))
    browser.find_element(By.ID, "go").click()
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "error").text)
    assert "not an image" in browser.find_element(By.ID, "error").text


# ---------------------------------------------------------------------------------------------- bounds
def test_json_bodies_are_read_and_other_types_refused(client):
    got = messages(client.post("/api/complete", json={"index": 1, "num": 1, "keep_rows": 7}))
    want = client.get("/api/test/1.png").content
    import base64

    assert base64.b64decode(got[0]["original"].split(",", 1)[1]) == want  # test image 1, not image 0
    assert got[0]["keep_rows"] == 7 and len(got[-2]["samples"]) == 1
    for body, expect in (("[1, 2]", "must be an object"), ("{nope", "not valid JSON")):
        r = client.post("/api/complete", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400 and expect in r.json()["error"]
    r = client.post("/api/complete", content=b"<x/>", headers={"content-type": "application/xml"})
    assert r.status_code == 415 and "multipart form or JSON" in r.json()["error"]


def test_concurrent_completions_are_capped_with_503(micro_run):
    completer = Completer(micro_run)
    c = TestClient(create_app(completer, LIMIT))
    for _ in range(serve.MAX_CONCURRENT):
        assert completer.slots.acquire(blocking=False)
    r = c.post("/api/complete", data={"num": "1"})
    assert r.status_code == 503 and r.headers["retry-after"] == "5" and "retry" in r.json()["error"]
    for _ in range(serve.MAX_CONCURRENT):
        completer.slots.release()
    messages(c.post("/api/complete", data={"num": "1"}))  # a slot is free again, and given back after
    assert all(completer.slots.acquire(blocking=False) for _ in range(serve.MAX_CONCURRENT))


def test_form_refusals_name_what_is_wrong(client):
    many = {f"f{i}": "1" for i in range(25)}
    assert "more than 20 fields" in client.post("/api/complete", data=many).json()["error"]
    two = [("file", ("a.png", png_bytes(), "image/png")), ("file", ("b.png", png_bytes(), "image/png"))]
    r = client.post("/api/complete", data={"source": "upload"}, files=two)
    assert r.status_code == 400 and "at most one file" in r.json()["error"]


def test_bomb_upload_says_so(client, monkeypatch):
    monkeypatch.setenv("IGPT_MAX_IMAGE_PIXELS", "100")
    r = client.post("/api/complete", data={"source": "upload"}, files={"file": ("b.png", png_bytes())})
    assert r.status_code == 413 and "over the limit" in r.json()["error"]


def test_undecodable_class_names_do_not_break_info(micro_run):
    completer = Completer(micro_run)
    completer.data.meta["class_names"] = ["caf\udce9", "ok"]  # a Latin-1 folder name, as Python keeps it
    info = TestClient(create_app(completer, LIMIT)).get("/api/info")
    assert info.status_code == 200 and info.json()["class_names"] == ["caf\ufffd", "ok"]


def test_loopback_hosts():
    assert is_loopback("127.0.0.2") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4")


def _read_all(sock: socket.socket, limit: float) -> bytes:
    sock.settimeout(limit)
    out = b""
    try:
        while chunk := sock.recv(65536):
            out += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return out


def test_slow_and_oversize_clients_are_answered_and_closed(micro_run, monkeypatch):
    monkeypatch.setattr(serve, "HEADER_TIMEOUT", 0.5)
    monkeypatch.setattr("igpt.serving.requests.BODY_TIMEOUT", 0.5)
    url, stop = start_server(Completer(micro_run))
    host, port = url[len("http://") :].split(":")
    try:
        # half-sent headers: closed after the header deadline (recv returns b"" on a closed socket)
        with socket.create_connection((host, int(port))) as s:
            s.sendall(b"POST /api/complete HTTP/1.1\r\nHost: x\r\n")
            t = time.perf_counter()
            assert _read_all(s, 5) == b"" and time.perf_counter() - t < 4
        # a body that stops arriving: 408, then closed
        with socket.create_connection((host, int(port))) as s:
            s.sendall(b"POST /api/complete HTTP/1.1\r\nHost: x\r\nContent-Length: 60000\r\n\r\nab")
            reply = _read_all(s, 5)
            assert reply.startswith(b"HTTP/1.1 408") and b"stopped arriving" in reply
        # an oversize chunked upload: 413 while the client is still sending, then closed
        with socket.create_connection((host, int(port))) as s:
            s.sendall(b"POST /api/complete HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
            chunk = b"%x\r\n%s\r\n" % (16384, b"x" * 16384)
            sent, reply = 0, b""
            while sent < 100 * 2**20 and not reply:  # a 100 MB body, unless the answer comes first
                try:
                    s.sendall(chunk)
                except (BrokenPipeError, ConnectionResetError):
                    break
                sent += len(chunk)
                if select.select([s], [], [], 0.01 if sent > LIMIT else 0)[0]:
                    reply = _read_all(s, 2)
            reply = reply or _read_all(s, 5)
            assert reply.startswith(b"HTTP/1.1 413") and b"connection: close" in reply.lower()
            assert sent < LIMIT + 4 * 2**20  # answered long before the body's end
    finally:
        stop()
