"""Image URLs (captioner/fetch.py): fetched with a timeout, a size cap and limited redirects, checked as
images, and refused on private, loopback and link-local addresses unless allowed; the same loader as
files afterwards. Every test talks to a real HTTP server on loopback that the test module starts."""

from __future__ import annotations

import io
import json
import socket
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from app_fixtures import load_app
from captioner.api import Captioner
from captioner.cli import main
from captioner.errors import ConfigError, ImageLoadError
from captioner.fetch import FetchConfig, fetch_image
from captioner.images import load_image
from conftest import draw

LIMIT = 50_000  # a small size cap, so the oversized bodies stay small
LOCAL = FetchConfig(timeout=1.0, max_bytes=LIMIT, max_redirects=3, allow_private=True)
PUBLIC_IP = "93.184.215.14"  # a global address the tests pretend some host names resolve to


class QuietServer(ThreadingHTTPServer):
    """A client that gives up mid-body (the size cap, the timeout) is expected here, not a server error."""

    def handle_error(self, request, client_address) -> None:
        pass


def jpeg_bytes() -> bytes:
    """A JPEG whose EXIF orientation must be applied (rotate 90), as a phone writes it."""
    img, exif = draw("red", "circle", "white", size=96, seed=1).resize((96, 64)), Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95, exif=exif)
    return buf.getvalue()


GOOD = jpeg_bytes()


class Handler(BaseHTTPRequestHandler):
    """The routes the tests need; every request is counted, so a test can tell that none was sent."""

    requests: list[str] = []

    def log_message(self, *args) -> None:
        pass

    def reply(self, status: int, body: bytes = b"", ctype: str = "image/jpeg", length: bool = True, **headers) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        for name, value in headers.items():
            self.send_header(name, value)
        if length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
        Handler.requests.append(self.path)
        port = self.server.server_address[1]
        route = self.path.split("?")[0]
        if route == "/good.jpg":
            self.reply(200, GOOD)
        elif route == "/slow.jpg":
            time.sleep(3)
            self.reply(200, GOOD)
        elif route == "/big.jpg":
            self.reply(200, b"\xff\xd8" + bytes(LIMIT))
        elif route == "/big-undeclared.jpg":  # no Content-Length: the size shows only while reading
            self.close_connection = True
            self.reply(200, b"\xff\xd8" + bytes(LIMIT), length=False)
        elif route == "/page.html":
            self.reply(200, b"<html><body><img src='/good.jpg'></body></html>", "text/html; charset=utf-8")
        elif route == "/noise.bin":
            self.reply(200, bytes(range(256)) * 8, "application/octet-stream")
        elif route == "/loop":
            self.reply(302, Location="/loop")
        elif route == "/moved.jpg":
            self.reply(301, Location="/good.jpg")
        elif route == "/to-loopback":
            self.reply(302, Location=f"http://127.0.0.1:{port}/good.jpg")
        else:
            self.reply(404, b"not found", "text/plain")


@pytest.fixture(scope="module")
def server():
    """``http://127.0.0.1:PORT`` of a threaded test server, for the whole module."""
    httpd = QuietServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads, httpd.block_on_close = True, False  # a sleeping handler must not hold up teardown
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    """``(https://localhost:PORT, certificate file)``: the same routes over TLS, with a self-signed
    certificate for the name ``localhost`` only."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    folder = tmp_path_factory.mktemp("tls")
    (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(folder / "cert.pem", folder / "key.pem")
    httpd = QuietServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"https://localhost:{httpd.server_address[1]}", folder / "cert.pem"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def captioner() -> Captioner:
    return Captioner.from_pretrained(device="cpu")


@pytest.fixture
def public_dns(monkeypatch, server):
    """``photos.example`` resolves to a public address whose connections reach the test server, and
    ``intranet.example`` to a private one: real code paths, only the network's answers are staged."""
    port = int(server.rsplit(":", 1)[1])
    real_resolve, real_connect = socket.getaddrinfo, socket.create_connection
    answers = {"photos.example": PUBLIC_IP, "intranet.example": "10.1.2.3"}

    def resolve(host, *args, **kwargs):
        if host in answers:
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (answers[host], port))]
        return real_resolve(host, *args, **kwargs)

    def connect(address, *args, **kwargs):
        if address[0] == PUBLIC_IP:
            return real_connect(("127.0.0.1", port), *args, **kwargs)
        if address[0] == "10.1.2.3":
            raise AssertionError("a refused address must never be connected to")
        return real_connect(address, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    monkeypatch.setattr(socket, "create_connection", connect)
    return f"http://photos.example:{port}"


def test_a_good_url_gives_the_same_pixels_as_the_file(server, tmp_path) -> None:
    """One loader: EXIF orientation, mode and JPEG draft apply to downloaded bytes exactly as to a file."""
    path = tmp_path / "good.jpg"
    path.write_bytes(GOOD)
    from_url = load_image(f"{server}/good.jpg", min_side=32, fetch=LOCAL)
    from_file = load_image(path, min_side=32)
    assert from_url.size == from_file.size == (32, 48)  # 96x64 stored, drafted at 1/2, rotated by EXIF
    assert np.array_equal(np.asarray(from_url), np.asarray(from_file))


def test_a_redirect_is_followed(server) -> None:
    assert fetch_image(f"{server}/moved.jpg", LOCAL) == GOOD


@pytest.mark.parametrize("route, reason", [
    ("/missing.jpg", r"HTTP 404 Not Found"),
    ("/page.html", r"not an image: the server sent text/html"),
    ("/noise.bin", r"not an image \(Pillow cannot identify"),
    ("/big.jpg", rf"too large: {LIMIT + 2} bytes \(the limit for images is {LIMIT}\)"),
    ("/big-undeclared.jpg", rf"too large: more than {LIMIT} bytes"),
    ("/loop", r"too many redirects \(more than 3\)"),
])
def test_a_bad_url_is_an_error_naming_the_url_and_the_reason(server, route, reason) -> None:
    url, before = f"{server}{route}", len(Handler.requests)
    with pytest.raises(ImageLoadError, match=reason) as caught:
        load_image(url, fetch=LOCAL)
    assert caught.value.source == url and str(caught.value).startswith(f"{url}: ")
    assert len(Handler.requests) - before == (1 + LOCAL.max_redirects if route == "/loop" else 1)


def test_a_slow_server_times_out_at_the_configured_time(server) -> None:
    start = time.monotonic()
    with pytest.raises(ImageLoadError, match=r"slow\.jpg: timed out after 1 s"):
        fetch_image(f"{server}/slow.jpg", LOCAL)
    assert time.monotonic() - start < 2.5  # the server answers after 3 s


def test_loopback_is_refused_unless_allowed_and_nothing_is_sent(server) -> None:
    before = len(Handler.requests)
    with pytest.raises(ImageLoadError, match=r"refused: 127\.0\.0\.1 is a loopback address"):
        fetch_image(f"{server}/good.jpg")  # the default config: private addresses refused
    assert len(Handler.requests) == before


@pytest.mark.parametrize("host, kind", [("[::1]", "::1 is a loopback"), ("10.0.0.7", "10.0.0.7 is a private"),
                                        ("169.254.169.254", "169.254.169.254 is a link-local"),  # cloud metadata
                                        ("[::ffff:127.0.0.1]", "::ffff:127.0.0.1 is a loopback"),
                                        ("0.0.0.0", "0.0.0.0 is an unspecified")])
def test_every_kind_of_non_public_address_is_refused(host, kind) -> None:
    with pytest.raises(ImageLoadError, match=f"refused: {kind}"):
        fetch_image(f"http://{host}:9/a.jpg")


def test_a_host_name_is_judged_by_the_address_it_resolves_to(server, public_dns) -> None:
    port = server.rsplit(":", 1)[1]
    with pytest.raises(ImageLoadError, match=r"refused: localhost resolves to (127\.0\.0\.1|::1), a loopback"):
        fetch_image(f"http://localhost:{port}/good.jpg")
    with pytest.raises(ImageLoadError, match=r"refused: intranet\.example resolves to 10\.1\.2\.3, a private"):
        fetch_image(f"http://intranet.example:{port}/good.jpg")
    assert fetch_image(f"{public_dns}/good.jpg") == GOOD  # a public address is fetched


def test_every_redirect_hop_is_checked_again(public_dns) -> None:
    """A public URL that redirects to 127.0.0.1 must not reach the loopback server."""
    with pytest.raises(ImageLoadError, match=r"to-loopback: redirected to http://127\.0\.0\.1:\d+/good\.jpg: "
                                             r"refused: 127\.0\.0\.1 is a loopback address"):
        fetch_image(f"{public_dns}/to-loopback")
    assert Handler.requests[-1] == "/to-loopback"  # the loopback target was never requested


def test_https_verifies_the_certificate_against_the_host_name(tls_server, monkeypatch) -> None:
    url, cert = tls_server
    with pytest.raises(ImageLoadError, match=r"TLS certificate not accepted \(self.signed certificate"):
        fetch_image(f"{url}/good.jpg", LOCAL)  # not signed by a trusted authority
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # now trusted, for the name localhost
    assert fetch_image(f"{url}/good.jpg", LOCAL) == GOOD
    with pytest.raises(ImageLoadError, match=r"TLS certificate not accepted \(IP address mismatch, certificate is "
                                             r"not valid for '127\.0\.0\.1'"):
        fetch_image(url.replace("localhost", "127.0.0.1") + "/good.jpg", LOCAL)


@pytest.mark.parametrize("url", ["ftp://example.com/a.jpg", "file:///etc/passwd", "gopher://example.com/1"])
def test_only_http_and_https_are_fetched(url) -> None:
    with pytest.raises(ImageLoadError, match=r"only http and https URLs are fetched"):
        load_image(url, fetch=LOCAL)


def test_the_api_captions_a_url_under_its_fetch_config(captioner, server, tmp_path) -> None:
    path = tmp_path / "good.jpg"
    path.write_bytes(GOOD)
    url = f"{server}/good.jpg"
    with pytest.raises(ImageLoadError, match="loopback"):
        captioner.caption(url)  # a new Captioner refuses private addresses
    captioner.fetch = FetchConfig(allow_private=True)
    try:
        assert captioner.caption(url) == captioner.caption(str(path))
    finally:
        captioner.fetch = FetchConfig()


def test_batch_keeps_going_past_failing_urls(server, tmp_path, capsys) -> None:
    """URLs are never globbed (``?``), each failing URL is its own error row, the rest is captioned."""
    path = tmp_path / "local.jpg"
    path.write_bytes(GOOD)
    good, missing, page = f"{server}/good.jpg?size=large", f"{server}/missing.jpg", f"{server}/page.html"
    out = tmp_path / "captions.jsonl"
    code = main(["caption", good, missing, str(path), page, "--allow-private-urls", "-o", str(out),
                 "--device", "cpu", "--workers", "0"])
    err = capsys.readouterr().err
    rows = {r["path"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert code == 1 and list(rows) == [good, missing, str(path), page]
    assert rows[good]["caption"] == rows[str(path)]["caption"]
    assert rows[missing]["error"] == "HTTP 404 Not Found" and "text/html" in rows[page]["error"]
    assert "captioned 2 of 4 image(s); 2 failed" in err
    assert main(["caption", good, "--device", "cpu", "--workers", "0"]) == 1  # without the flag: refused
    assert "loopback address" in capsys.readouterr().out


def test_web_images_get_no_metadata_and_are_linked_in_the_report(server, tmp_path, capsys) -> None:
    """There is no local file to write a caption into, nor to thumbnail: the HTML page loads the URL."""
    url, html = f"{server}/good.jpg", tmp_path / "report.html"
    assert main(["caption", url, "--allow-private-urls", "--write-metadata", "xmp", "--html", str(html),
                 "--device", "cpu", "--workers", "0"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["metadata"] == [{"kind": "xmp", "target": url, "status": "unsupported",
                                   "message": "a web image (URL), not a local file"}]
    assert f'"thumb":"{url}"' in html.read_text()


def test_the_app_refuses_private_urls_and_paths(captioner, server) -> None:
    """The demo is public: its URL box never reaches the server's own network or files, whatever the
    captioner in it allows; its upload limit is the URL limit."""
    import gradio as gr
    app = load_app()
    captioner.fetch = FetchConfig(allow_private=True)
    try:
        with pytest.raises(gr.Error, match=r"good\.jpg: refused: 127\.0\.0\.1 is a loopback address"):
            app.caption_upload(captioner, None, "greedy", 1.0, 1.0, 1, 1, url=f"{server}/good.jpg")
        with pytest.raises(gr.Error, match=r"/etc/hostname: not a URL"):
            app.caption_upload(captioner, None, "greedy", 1.0, 1.0, 1, 1, url="/etc/hostname")
    finally:
        captioner.fetch = FetchConfig()
    assert app.MAX_FILE_SIZE == FetchConfig().max_bytes


@pytest.mark.parametrize("options, message", [({"timeout": "10"}, "option timeout must be float"),
                                              ({"allow_private": "yes"}, "option allow_private must be bool"),
                                              ({"max_redirects": -1}, "max_redirects >= 0"), ({"timeout": 0}, "timeout > 0")])
def test_a_fetch_config_with_a_wrong_value_is_refused_by_name(options, message):
    with pytest.raises(ConfigError, match=message):
        FetchConfig(**options)
