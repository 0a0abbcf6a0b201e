"""The app's security defaults, checked on really served apps over HTTP (CPU, offline).

test_app.py checks what `launch_kwargs` returns; these check what a client on the wire actually gets, so a Gradio
upgrade that changes what a launch option means, or a launch path that drops one, fails here.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import sys
import tempfile
import urllib.parse
import uuid
from pathlib import Path

import httpx
import pytest

import app as lab_app
from network import non_loopback_ipv4
from engine.lab.session import LabSession

LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp's `st` column


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def _proc_address(hex_address: str) -> str:
    """A /proc/net/tcp{,6} address: 32-bit words in host byte order."""
    raw = bytes.fromhex(hex_address)
    if sys.byteorder == "little":
        raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, raw)


def _listening_addresses(port: int) -> set[str]:
    """Every local address with a socket in LISTEN state on `port` (IPv4 and IPv6), from the kernel's own table."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, hex_port = fields[1].split(":")
            if fields[3] == LISTEN and int(hex_port, 16) == port:
                found.add(_proc_address(address))
    return found


def _request(host: str, port: int, method: str, path: str, *, body: bytes | None = None,
             headers: dict | None = None) -> tuple[int, dict, bytes]:
    """One request with `path` sent verbatim: httpx and urllib normalise `..` away, which would hide traversal."""
    connection = http.client.HTTPConnection(host, port, timeout=30)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def _host_port(demo) -> tuple[str, int]:
    url = urllib.parse.urlsplit(demo.local_url)
    return url.hostname, url.port


@pytest.fixture(scope="module")
def session():
    """One tiny CPU model shared by the module's apps (each app only needs something loaded)."""
    lab = LabSession()
    lab.load("synthetic:tiny-llama", device="cpu", dtype="float32")
    yield lab
    shutil.rmtree(lab.export_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def served(session):
    """The app served exactly as `python app.py` serves it: the command line's defaults, nothing added."""
    demo = lab_app.build_app(session)
    options = lab_app.launch_kwargs(lab_app.parse_args([]), export_dir=session.export_dir)
    demo.queue(default_concurrency_limit=1).launch(prevent_thread_lock=True, quiet=True, **options)
    try:
        yield demo, options
    finally:
        demo.close()


@pytest.fixture(scope="module")
def authed(session):
    """The app on this machine's outward address, as `--host <ip> --auth user:secret` serves it.

    With no outward IPv4 (an isolated sandbox) it falls back to loopback with the same --auth: what is under test
    is that a given password is enforced on every route, which does not depend on the address."""
    host = non_loopback_ipv4() or "127.0.0.1"
    args = lab_app.parse_args(["--host", host, "--auth", "user:secret", "--port", str(_free_port(host))])
    demo = lab_app.build_app(session)
    options = lab_app.launch_kwargs(args, export_dir=session.export_dir)
    demo.queue(default_concurrency_limit=1).launch(prevent_thread_lock=True, quiet=True, **options)
    try:
        yield demo, host
    finally:
        demo.close()


# ---- 1. loopback bind ------------------------------------------------------------------------------------------

def test_the_app_listens_on_loopback_only(served):
    """The kernel's socket table shows the port bound to 127.0.0.1 alone, and the outward address refuses it."""
    demo, options = served
    host, port = _host_port(demo)
    assert options["server_name"] == "127.0.0.1" and host == "127.0.0.1"
    # The app answers on the port we inspect (so an empty table below could not pass by looking at the wrong port).
    assert _request(host, port, "GET", "/config")[0] == 200
    # Not 0.0.0.0 or :: (every interface), not the outward address: exactly loopback.
    assert _listening_addresses(port) == {"127.0.0.1"}
    outward = non_loopback_ipv4()
    if outward is None:
        pytest.skip("no non-loopback IPv4 on this machine to try the port from")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((outward, port), timeout=5).close()


# ---- 2. no share link ------------------------------------------------------------------------------------------

def test_no_share_link_is_opened(served):
    """No public tunnel: share off, no share URL, no tunnel process, and the page is the local build (not share.html)."""
    from gradio import tunneling

    demo, options = served
    assert options["share"] is False and demo.share is False and demo.share_url is None
    assert tunneling.CURRENT_TUNNELS == []
    status, _, page = _request(*_host_port(demo), "GET", "/")
    # share.html loads Gradio's JS from a CDN; the local page loads it from ./assets.
    assert status == 200 and b"./assets/index-" in page and b"gradio.s3" not in page


# ---- 3. auth for non-loopback ----------------------------------------------------------------------------------

def test_launch_refuses_a_non_loopback_host_without_auth_or_with_a_malformed_one():
    """Any address a remote client could reach needs --auth user:password, both parts non-empty."""
    outward = non_loopback_ipv4() or "10.1.2.3"
    for host in ("0.0.0.0", "::", outward, "kvlab.example.org", "127.0.0.1.nip.io"):
        with pytest.raises(SystemExit, match="without --auth"):
            lab_app.checked_auth(lab_app.parse_args(["--host", host]))
    for auth in ("nopassword", ":secret", "user:", ":"):
        with pytest.raises(SystemExit, match="user:password"):
            lab_app.checked_auth(lab_app.parse_args(["--host", outward, "--auth", auth]))
    with pytest.raises(SystemExit):  # argparse: --auth with no value
        lab_app.parse_args(["--host", outward, "--auth"])
    # A password may itself hold a colon: only the first one splits.
    assert lab_app.checked_auth(lab_app.parse_args(["--host", outward, "--auth", "u:p:q"])) == ("u", "p:q")


def test_without_logging_in_nothing_but_the_login_page_is_served(authed, session):
    """Config, API info, API calls, the queue, files and uploads all answer 401 before login; / is the login page."""
    demo, host = authed
    _, port = _host_port(demo)
    assert _listening_addresses(port) == {host}
    exported = session.export_dir / f"kvlab-auth-{uuid.uuid4().hex}.txt"
    exported.write_text("exported trace")
    try:
        json_body = {"body": b'{"data": []}', "headers": {"Content-Type": "application/json"}}
        for method, path, extra in [
            ("GET", "/config", {}),
            ("GET", "/gradio_api/info", {}),
            ("POST", "/gradio_api/call/stop_profile", json_body),
            ("POST", "/gradio_api/run/stop_profile", json_body),
            ("POST", "/gradio_api/queue/join", json_body),
            ("GET", f"/gradio_api/file={exported}", {}),  # even a file the app may serve needs a login
            ("POST", "/gradio_api/upload", {"body": b"--x--\r\n",
                                             "headers": {"Content-Type": "multipart/form-data; boundary=x"}}),
        ]:
            status, _, body = _request(host, port, method, path, **extra)
            assert status == 401, (method, path, status)
            assert json.loads(body)["detail"]["error"] == "Not authenticated"
        status, _, page = _request(host, port, "GET", "/")
        # The page is served (it holds the login form), with a stub config: no components, no dependencies.
        assert status == 200 and b'"auth_required":true' in page.replace(b" ", b"")
        assert b"Scheduler explorer" not in page  # a tab label: in the page's config once logged in
    finally:
        exported.unlink()


def test_the_right_password_works_and_a_wrong_one_is_refused(authed):
    """The client logs in and calls the API; a wrong password or none is refused at login."""
    from gradio_client import Client
    from gradio_client.exceptions import AuthenticationError

    demo, host = authed
    _, port = _host_port(demo)
    client = Client(demo.local_url, auth=("user", "secret"), verbose=False)
    assert client.predict(api_name="/stop_profile")["message"] == "No profile of yours is running."
    with pytest.raises(ValueError, match="Could not login"):
        Client(demo.local_url, auth=("user", "wrong"), verbose=False)
    with pytest.raises(ValueError, match="Could not login"):
        Client(demo.local_url, auth=("someone", "secret"), verbose=False)
    with pytest.raises(AuthenticationError):
        Client(demo.local_url, verbose=False)
    # On the wire: a wrong password gets 400 and no cookie, so /config stays 401; the right one gets a cookie
    # that opens /config (so the 401s above are the login check, not broken routes).
    with httpx.Client(base_url=demo.local_url, timeout=30) as web:
        wrong = web.post("/login", data={"username": "user", "password": "wrong"})
        assert wrong.status_code == 400 and not wrong.cookies and web.get("/config").status_code == 401
        assert web.post("/login", data={"username": "user", "password": "secret"}).status_code == 200
        assert web.get("/config").status_code == 200


def test_the_notebook_entry_point_refuses_a_non_loopback_host_without_auth():
    """`lab()` promises the command line's defaults, so it must refuse an outward address without auth too."""
    outward = non_loopback_ipv4() or "0.0.0.0"
    demo = None
    try:
        # A refusal before anything is served; its wording and type (SystemExit as the CLI, or ValueError) are free.
        with pytest.raises((SystemExit, ValueError), match="auth"):
            demo = lab_app.lab("synthetic:tiny-llama", inline=False, prevent_thread_lock=True, quiet=True,
                               server_name=outward, server_port=_free_port(outward))
    finally:
        if demo is not None:  # the defect: it launched; show it is reachable without a login, then stop it
            try:
                host, port = _host_port(demo)
                assert _request(outward if outward != "0.0.0.0" else host, port, "GET", "/config")[0] == 200
            finally:
                demo.close()


# ---- 4. no run history -----------------------------------------------------------------------------------------

def test_no_run_history(served):
    """The config tells the browser not to record runs, and the run-history page and its API are not served."""
    demo, _ = served
    host, port = _host_port(demo)
    status, _, body = _request(host, port, "GET", "/config")
    config = json.loads(body)
    assert status == 200 and config["run_history"] is False and "runs" not in config["footer_links"]
    assert _request(host, port, "GET", "/gradio_api/runs")[0] == 404
    assert _request(host, port, "GET", "/gradio_api/runs/")[0] == 404
    # The history API (Hugging Face bucket storage) is only registered when run history is on.
    assert _request(host, port, "GET", "/gradio_api/run-history/records")[0] == 404
    assert _request(host, port, "GET", "/gradio_api/run-history/buckets")[0] == 404
    assert _request(host, port, "POST", "/gradio_api/run-history/connect", body=b'{"bucket_id": "a/b"}',
                    headers={"Content-Type": "application/json"})[0] == 404


# ---- 5. no monitoring ------------------------------------------------------------------------------------------

def test_no_monitoring_endpoint(served):
    """/monitoring and its summary are 403, and even the real analytics key never opens the dashboard."""
    demo, _ = served
    host, port = _host_port(demo)
    for path in ("/monitoring", "/monitoring/summary", "/monitoring/not-the-key"):
        status, _, body = _request(host, port, "GET", path)
        assert status == 403 and json.loads(body)["detail"] == "Monitoring is not enabled.", (path, status)
    # With monitoring on, /monitoring/<key> redirects to a mounted dashboard: here not even the right key does.
    key = demo.server_app.analytics_key
    status, headers, _ = _request(host, port, "GET", f"/monitoring/{key}")
    assert status == 403 and "location" not in headers
    assert _request(host, port, "GET", f"/monitoring/{key}/dashboard")[0] == 404
    assert demo.server_app.monitoring_enabled is False
    # Gradio's request-timing routes exist only under GRADIO_PROFILING, which nothing here sets.
    assert _request(host, port, "GET", "/gradio_api/profiling/summary")[0] == 404
    assert _request(host, port, "GET", "/gradio_api/profiling/traces")[0] == 404
    # Nor an MCP server (tool calls outside the queue): off unless GRADIO_MCP_SERVER turns it on.
    status, _, body = _request(host, port, "GET", "/config")
    assert json.loads(body)["mcp_server"] is False
    assert _request(host, port, "GET", "/gradio_api/mcp/schema")[0] == 404


# ---- 6. files: the export dir only ----------------------------------------------------------------------------

def test_files_are_served_from_the_export_dir_only(served, session):
    """An exported file downloads; system files, the repo, other temp dirs, `..`, symlinks and look-alike dirs don't."""
    demo, _ = served
    host, port = _host_port(demo)
    export_dir = session.export_dir
    tag = uuid.uuid4().hex
    secret = f"not for download {tag}".encode()
    exported = export_dir / f"kvlab-run-{tag}.trace.json"
    exported.write_text(json.dumps({"traceEvents": [], "tag": tag}))
    # A secret next to the export dir (the `..` target), one in an unrelated temp dir, one in a look-alike dir
    # whose name merely starts with the export dir's (a prefix check would let it through).
    beside = export_dir.parent / f"kvlab-secret-{tag}.txt"
    other_dir = Path(tempfile.mkdtemp(prefix="kvlab-other-"))
    lookalike_dir = Path(f"{export_dir}-evil")
    lookalike_dir.mkdir()
    link = export_dir / f"link-{tag}.txt"
    try:
        for path in (beside, other_dir / "secret.txt", lookalike_dir / "secret.txt"):
            path.write_bytes(secret)
        link.symlink_to(beside)

        status, headers, body = _request(host, port, "GET", f"/gradio_api/file={exported}")
        assert status == 200 and body == exported.read_bytes()
        assert lab_app.launch_kwargs(lab_app.parse_args([]), export_dir=export_dir)["allowed_paths"] == [str(export_dir)]

        refused = {
            "/etc/passwd": "/etc/passwd",
            "the repo's app.py": str(Path(lab_app.__file__).resolve()),
            "the repo's app.py, relative to the cwd": "app.py",
            "another temp dir": str(other_dir / "secret.txt"),
            "a look-alike dir": str(lookalike_dir / "secret.txt"),
            "`..` from the export dir": f"{export_dir}/../{beside.name}",
            "`..`, percent-encoded": f"{export_dir}/%2E%2E/{beside.name}",
            "a symlink in the export dir": str(link),
            "the export dir itself": str(export_dir),
        }
        for what, path in refused.items():
            status, _, body = _request(host, port, "GET", f"/gradio_api/file={path}")
            # 403 from Gradio's allowed-path check (every target exists, so it is not a missing-file answer).
            assert status == 403 and json.loads(body)["detail"].startswith("File not allowed"), (what, status)
            assert secret not in body and b"root:" not in body and b"def build_app" not in body, what
        # Gradio 3's un-prefixed file route is not served at all.
        assert _request(host, port, "GET", "/file=/etc/passwd")[0] == 404
    finally:
        for path in (exported, link, beside):
            path.unlink(missing_ok=True)
        shutil.rmtree(other_dir, ignore_errors=True)
        shutil.rmtree(lookalike_dir, ignore_errors=True)


# ---- 7. upload size --------------------------------------------------------------------------------------------

def _large_files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file() and p.stat().st_size > (1 << 20)} if root.exists() else set()


def test_uploads_over_the_limit_are_refused(served):
    """A file one byte over MAX_UPLOAD gets 413 and leaves nothing behind; a small one is accepted and served back."""
    demo, _ = served
    assert lab_app.MAX_UPLOAD == "64mb"
    limit = 64 * 1024 * 1024  # Gradio reads "mb" as MiB
    upload_dir = Path(demo.server_app.uploaded_file_dir)
    tag = uuid.uuid4().hex
    with httpx.Client(base_url=demo.local_url, timeout=120) as web:
        small = web.post("/gradio_api/upload", files={"files": (f"small-{tag}.trace.json", b'{"traceEvents": []}')})
        assert small.status_code == 200
        (stored,) = small.json()
        stored = Path(stored)
        try:
            assert stored.read_bytes() == b'{"traceEvents": []}' and upload_dir in stored.parents
            assert web.get(f"/gradio_api/file={stored}").content == b'{"traceEvents": []}'
        finally:
            stored.unlink(missing_ok=True)

        before = _large_files(upload_dir)
        big = web.post("/gradio_api/upload", files={"files": (f"big-{tag}.trace.json", bytes(limit + 1))})
        assert big.status_code == 413
        assert big.text == f"File size exceeded maximum allowed size of {limit} bytes."
    # Neither the named file nor the parser's temporary copy is left in the upload dir.
    assert not list(upload_dir.rglob(f"big-{tag}*"))
    assert _large_files(upload_dir) <= before
