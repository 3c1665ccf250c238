"""An S3-compatible store from before boto3 1.36's checksums, for the tests: a proxy in front of the session's
SeaweedFS that refuses what such stores refuse, and passes everything else through unchanged.

SeaweedFS takes boto3's new CRC checksums. Many S3-compatible stores do not, and refused every write once
boto3 1.36 began to send them by default (boto/boto3#4392). What this proxy refuses, each as a store was
reported to refuse it:

* a ``PUT`` (PutObject, UploadPart) carrying ``x-amz-sdk-checksum-algorithm`` or an ``x-amz-checksum-*``
  header: 400 ``InvalidArgument``, "unsupported header" (Backblaze B2, boto/s3transfer#327);
* an ``aws-chunked`` body (``Content-Encoding: aws-chunked``, a ``STREAMING-*`` payload hash): 501
  ``NotImplemented`` (OpenStack Swift's s3api, boto/boto3#4409);
* a DeleteObjects (``POST ?delete``) without ``Content-MD5``: 400 ``MissingContentMD5`` (MinIO before it took
  the CRC header instead: aws/aws-sdk-php#3068, CERT-Polska/karton#269).

The request goes to SeaweedFS as it came (its SigV4 signature covers the ``Host`` the client sent, which is
kept), less the hop-by-hop headers and ``Expect`` (which SigV4 does not sign).
"""

from __future__ import annotations

import http.client
import http.server
import threading
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "expect",
              "proxy-connection"}


@dataclass
class Seen:
    """What the proxy saw: each request's method, path and header names, and what it refused."""

    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    refused: list[tuple[str, str, str]] = field(default_factory=list)  # method, path, S3 error code


def _refusal(method: str, path: str, headers: http.client.HTTPMessage) -> tuple[int, str, str] | None:
    names = {k.lower() for k in headers}
    query = urllib.parse.urlsplit(path).query
    encoding = (headers.get("Content-Encoding") or "").lower()
    payload = headers.get("x-amz-content-sha256") or ""
    if "aws-chunked" in encoding or payload.startswith("STREAMING-"):
        return 501, "NotImplemented", "Transferring a payload in aws-chunked encoding is not supported."
    if method == "PUT":
        for name in sorted(names):
            if name == "x-amz-sdk-checksum-algorithm" or name.startswith("x-amz-checksum-"):
                return 400, "InvalidArgument", f"Unsupported header '{name}' received for this API call."
    if method == "POST" and "delete" in urllib.parse.parse_qs(query, keep_blank_values=True) \
            and "content-md5" not in names:
        return 400, "MissingContentMD5", "Missing required header for this request: Content-Md5."
    return None


@contextmanager
def pre_checksum_store(upstream: str) -> Iterator[tuple[str, Seen]]:
    """A proxy to the S3 server at ``upstream`` (``http://host:port``) as a store without the flexible checksums:
    its URL and what it saw."""
    up = urllib.parse.urlsplit(upstream)
    seen = Seen()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive and 100-continue, as botocore expects of S3

        def _relay(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            seen.requests.append((self.command, self.path, {k.lower(): v for k, v in self.headers.items()}))
            refusal = _refusal(self.command, self.path, self.headers)
            if refusal is not None:
                status, code, message = refusal
                seen.refused.append((self.command, self.path, code))
                xml = (f"<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{code}</Code>"
                       f"<Message>{message}</Message></Error>").encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(xml)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(xml)
                return
            conn = http.client.HTTPConnection(up.hostname or "127.0.0.1", up.port or 80, timeout=60)
            try:
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                conn.request(self.command, self.path, body=body if length else None, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in HOP_BY_HOP and k.lower() != "content-length":
                        self.send_header(k, v)
                # HEAD: the object's size as the server said it, with no body
                size = (resp.getheader("Content-Length") or "0") if self.command == "HEAD" else str(len(data))
                self.send_header("Content-Length", size)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
            finally:
                conn.close()

        do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _relay

        def log_message(self, *args: object) -> None:
            pass

    with serving(Handler) as url:
        yield url, seen


@contextmanager
def serving(handler: type[http.server.BaseHTTPRequestHandler]) -> Iterator[str]:
    """``handler`` served on a loopback port in a thread: the server's URL, until the block ends."""
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    srv.daemon_threads = True
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()
