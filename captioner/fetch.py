"""Step 0 of the data flow for web images: an http(s) URL -> the bytes of one image, or a clear error.

``images.load_image`` hands URL strings here and decodes the bytes exactly like a file (EXIF, modes,
bomb guard, JPEG draft), so the API, ``captioner caption`` and the app see the same pixels for a
photo whether it comes from disk or from the web.

Why not ``urllib.request.urlopen``: a server that fetches URLs for others must not become a proxy
into its own network (SSRF). Every hop (the URL and each redirect) is parsed, its host resolved, and
every address checked before anything is sent; the connection then goes to a checked address, not
to a second DNS answer that could differ (DNS rebinding). Private, loopback, link-local and other
non-public addresses are refused unless ``FetchConfig.allow_private`` is set. Proxies from the
environment are not used: they would defeat the address check.
"""

from __future__ import annotations

import http.client
import ipaddress
import re
import socket
import ssl
import time
import urllib.parse
from dataclasses import dataclass

from .errors import ConfigError, ImageLoadError
from .options import check_types

MAX_IMAGE_BYTES = 20 * 1024 * 1024
"""The largest image accepted from the network, uploads to the app and URLs alike: a phone photo fits,
a multi-hundred-MB body is refused before it is stored."""
SCHEMES = ("http", "https")  # the only ones fetched
REDIRECTS = (301, 302, 303, 307, 308)
NOT_IMAGES = ("text/", "application/json", "application/xml", "application/xhtml")  # Content-Type prefixes
CHUNK = 64 * 1024
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")  # two letters at least: "C://x" stays a Windows path
_URL_SAFE = "/%:@!$&'()*+,;=?-._~"  # characters a request target may keep; the rest are percent-encoded


@dataclass(frozen=True)
class FetchConfig:
    """How an image URL is fetched; the defaults are the safe ones a public server needs."""

    timeout: float = 10.0  # seconds for the whole download, every redirect included
    max_bytes: int = MAX_IMAGE_BYTES
    max_redirects: int = 5
    allow_private: bool = False  # also fetch from private, loopback and link-local addresses

    def __post_init__(self) -> None:
        check_types(self)
        if self.timeout <= 0 or self.max_bytes < 1 or self.max_redirects < 0:
            raise ConfigError(f"need timeout > 0, max_bytes >= 1 and max_redirects >= 0, got {self}")


def is_url(src: object) -> bool:
    """Whether an image source is a URL (``scheme://...``) rather than a path; only strings can be.

    Any scheme counts, so ``ftp://`` or ``file://`` reach ``fetch_image`` and are refused by name
    instead of being looked up as odd file names (or globbed: ``?`` is common in URLs)."""
    return isinstance(src, str) and bool(_SCHEME.match(src))


def _kind(address: str) -> str | None:
    """Why an IP address is not public ("loopback", "private", ...), or None for a public one."""
    ip = ipaddress.ip_address(address.split("%")[0])  # an IPv6 scope ("fe80::1%eth0") is not part of it
    if isinstance(ip, ipaddress.IPv6Address):
        ip = ip.ipv4_mapped or ip.sixtofour or ip  # ::ffff:127.0.0.1 and 2002:7f00:1:: reach 127.0.0.1
    for kind in ("loopback", "link_local", "unspecified", "multicast", "private", "reserved"):
        if getattr(ip, f"is_{kind}"):
            return kind.replace("_", "-")
    return None if ip.is_global else "non-public"


class _Pinned(http.client.HTTPConnection):
    """An HTTP connection to one already checked address; ``host`` still names the server (Host header)."""

    def __init__(self, host: str, port: int, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self.address = address
        self.raw: socket.socket | None = None  # kept: http.client drops ``sock`` once the response owns it

    def connect(self) -> None:
        self.sock = self.raw = socket.create_connection((self.address, self.port), self.timeout)


class _PinnedTLS(_Pinned):
    """HTTPS to one checked address; the certificate is verified against the host name (SNI too)."""

    default_port = http.client.HTTPS_PORT

    def connect(self) -> None:
        super().connect()
        context = ssl.create_default_context()  # the system's CAs (or $SSL_CERT_FILE) as they are now
        self.sock = self.raw = context.wrap_socket(self.sock, server_hostname=self.host)


class _Fetch:
    """One URL's download: the hops it follows, the time left, the bytes read."""

    def __init__(self, url: str, config: FetchConfig) -> None:
        self.url, self.config = url, config
        self.deadline = time.monotonic() + config.timeout

    def fail(self, reason: str, hop: str) -> ImageLoadError:
        """The error names the URL as given; a redirect target is named in the reason."""
        return ImageLoadError(self.url, reason if hop == self.url else f"redirected to {hop}: {reason}")

    def left(self, hop: str) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise self.fail(f"timed out after {self.config.timeout:g} s", hop)
        return left

    def target(self, hop: str) -> tuple[str, str, int, str]:
        """Scheme, host, port and request target of a URL; anything but http(s) with a host is refused."""
        try:
            parts = urllib.parse.urlsplit(hop)
            port = parts.port
        except ValueError as err:
            raise self.fail(f"invalid URL ({err})", hop) from None
        scheme = parts.scheme.lower()
        if scheme not in SCHEMES:
            raise self.fail(f"only http and https URLs are fetched, not {scheme}://", hop)
        if not parts.hostname:
            raise self.fail("invalid URL (no host name)", hop)
        path = urllib.parse.quote(parts.path or "/", safe=_URL_SAFE)
        query = "?" + urllib.parse.quote(parts.query, safe=_URL_SAFE) if parts.query else ""
        return scheme, parts.hostname, port or (443 if scheme == "https" else 80), path + query

    def addresses(self, hop: str, host: str, port: int) -> list[str]:
        """Every address ``host`` resolves to; all must be public unless private ones are allowed."""
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as err:
            raise self.fail(f"cannot resolve host {host!r} ({err})", hop) from None
        found = list(dict.fromkeys(str(info[4][0]) for info in infos))
        if not self.config.allow_private:
            for address in found:
                if kind := _kind(address):
                    named = f"{host} is" if host == address else f"{host} resolves to {address},"
                    article = "an" if kind[0] in "aeiou" else "a"
                    raise self.fail(f"refused: {named} {article} {kind} address (not fetched unless private addresses "
                                    "are allowed)", hop)
        return found

    def connect(self, hop: str, scheme: str, host: str, port: int) -> _Pinned:
        """A connection to the first checked address that answers."""
        kind = _PinnedTLS if scheme == "https" else _Pinned
        error: OSError | None = None
        for address in self.addresses(hop, host, port):
            conn = kind(host, port, address, self.left(hop))
            try:
                conn.connect()
                return conn
            except ssl.SSLError:  # the server answered: its certificate is the problem, not the route
                raise
            except OSError as err:
                error = err
        raise error or OSError(f"no address for {host}")

    def get(self, hop: str) -> tuple[str | None, bytes]:
        """One request: ``(redirect location, b"")`` or ``(None, the body)``."""
        scheme, host, port, target = self.target(hop)
        conn = self.connect(hop, scheme, host, port)
        try:
            conn.raw.settimeout(self.left(hop))
            conn.request("GET", target, headers={"Accept": "image/*", "Accept-Encoding": "identity",
                                                 "User-Agent": "captioner"})
            response = conn.getresponse()
            if response.status in REDIRECTS:
                location = response.getheader("Location")
                if not location:
                    raise self.fail(f"HTTP {response.status} redirect without a Location header", hop)
                return urllib.parse.urljoin(hop, location.strip()), b""
            if response.status != 200:
                raise self.fail(f"HTTP {response.status} {response.reason}".rstrip(), hop)
            ctype = (response.getheader("Content-Type") or "").split(";")[0].strip().lower()
            if ctype.startswith(NOT_IMAGES):
                raise self.fail(f"not an image: the server sent {ctype} (a web page? link to the image file "
                                "itself)", hop)
            return None, self.body(hop, conn, response)
        finally:
            conn.close()

    def body(self, hop: str, conn: _Pinned, response: http.client.HTTPResponse) -> bytes:
        """The body, refused as soon as it is known to exceed ``max_bytes`` (declared or as it arrives)."""
        limit = self.config.max_bytes
        declared = response.getheader("Content-Length")
        if declared and declared.strip().isdigit() and int(declared) > limit:
            raise self.fail(f"too large: {int(declared)} bytes (the limit for images is {limit})", hop)
        chunks, size = [], 0
        while not response.isclosed():  # closed once the declared length is read
            conn.raw.settimeout(self.left(hop))  # each read waits at most for the time left
            chunk = response.read(min(CHUNK, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                raise self.fail(f"too large: more than {limit} bytes (the limit for images)", hop)
        if not size:
            raise self.fail("empty response (0 bytes)", hop)
        return b"".join(chunks)

    def run(self) -> bytes:
        """Follow redirects up to the limit; network failures become ``ImageLoadError`` with the reason."""
        hop = self.url
        for _ in range(self.config.max_redirects + 1):
            try:
                location, data = self.get(hop)
            except ImageLoadError:
                raise
            except TimeoutError:
                raise self.fail(f"timed out after {self.config.timeout:g} s", hop) from None
            except ssl.SSLCertVerificationError as err:
                raise self.fail(f"TLS certificate not accepted ({err.verify_message})", hop) from None
            except ssl.SSLError as err:
                raise self.fail(f"TLS error ({err.reason or err})", hop) from None
            except http.client.HTTPException as err:
                raise self.fail(f"bad HTTP response ({type(err).__name__}: {err})", hop) from None
            except OSError as err:
                raise self.fail(f"cannot connect ({err.strerror or err})", hop) from None
            if location is None:
                return data
            hop = location
        raise self.fail(f"too many redirects (more than {self.config.max_redirects})", self.url)


def fetch_image(url: str, config: FetchConfig = FetchConfig()) -> bytes:
    """The body of an http(s) URL that should be an image; ``ImageLoadError(url, reason)`` otherwise.

    Limits: ``config.timeout`` for everything, ``config.max_bytes`` of body, ``config.max_redirects``
    hops, each checked like the first. Whether the bytes are an image is for Pillow to judge
    (``load_image``); a declared web page (``text/html``, ...) is refused here without reading it.
    """
    return _Fetch(url, config).run()
