"""Fixtures shared by the test modules."""
import functools
import http.server
import threading

import pytest


@pytest.fixture
def http_root(tmp_path, monkeypatch):
    """A folder served at http://127.0.0.1:PORT/ for the test (loopback only), and an empty vitkit cache."""
    root = tmp_path / "served"
    root.mkdir()
    monkeypatch.setenv("VITKIT_CACHE", str(tmp_path / "cache"))
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}", server
    server.shutdown()
    server.server_close()
