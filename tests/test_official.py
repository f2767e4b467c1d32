"""--official: the authors' checkpoints fetched from a loopback HTTP server (never the internet), verified, cached.

The fetch, checksum and offline tests need no real checkpoint: where ../shared/official_checkpoints/ is absent they
serve 8 synthetic files and pin those files' hashes, so they run on every clone."""
import functools
import http.server
import os
import shutil
import subprocess
import sys
import threading

import pandas as pd
import pytest
from conftest import OFFICIAL, ROOT, needs_official

import official


@pytest.fixture
def server(tmp_path, monkeypatch):
    """Serves a copy of the authors' checkpoints (synthetic files with their hashes pinned, where the real ones are
    absent) on 127.0.0.1; yields (base URL, served folder, request log)."""
    served = tmp_path / "served"
    if OFFICIAL.is_dir():
        shutil.copytree(OFFICIAL, served)
    else:
        served.mkdir()
        for i, name in enumerate(official.OFFICIAL_SHA256):
            (served / name).write_bytes(os.urandom(1000 + i))
        monkeypatch.setattr(official, "OFFICIAL_SHA256",
                            {name: official.sha256_of(served / name) for name in official.OFFICIAL_SHA256})
    requests = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            requests.append(self.path)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=served))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", served, requests
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def env(tmp_path, monkeypatch, server):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    for variable in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(variable, raising=False)  # the loopback server is reached directly, never through a proxy
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv(official.OFFICIAL_URL_VARIABLE, server[0])
    return server


@needs_official
def test_pinned_hashes_are_the_released_files():
    sums = dict(line.split()[::-1] for line in (OFFICIAL / "SHA256SUMS").read_text().splitlines())
    assert sums == official.OFFICIAL_SHA256
    assert all(official.sha256_of(OFFICIAL / name) == sha for name, sha in sums.items())


def test_fetch_verifies_caches_and_fetches_once(env, tmp_path):
    _, _, requests = env
    folder = official.fetch_official(progress=False, log=lambda *_: None)
    assert folder == official.official_cache_dir() and str(folder).startswith(str(tmp_path / "cache"))
    assert sorted(p.name for p in folder.iterdir()) == sorted(official.OFFICIAL_SHA256)
    assert all((folder / n).read_bytes() == (env[1] / n).read_bytes() for n in official.OFFICIAL_SHA256)
    assert len(requests) == 8
    official.fetch_official(progress=False, log=lambda *_: None)
    assert len(requests) == 8  # verified cached files are not fetched again
    (folder / "4_heads_copy.pt").write_bytes(b"corrupted")
    official.fetch_official(progress=False, log=lambda *_: None)
    assert requests[-1].endswith("/4_heads_copy.pt") and len(requests) == 9


def test_tampered_file_is_refused_and_not_kept(env):
    _, served, _ = env
    tampered = bytearray((served / "8_heads_cycle.pt").read_bytes())
    tampered[-100] ^= 1
    (served / "8_heads_cycle.pt").write_bytes(bytes(tampered))
    with pytest.raises(RuntimeError) as error:
        official.fetch_official(progress=False, log=lambda *_: None)
    message = str(error.value)
    assert "8_heads_cycle.pt" in message and official.OFFICIAL_SHA256["8_heads_cycle.pt"] in message
    assert official.sha256_of(served / "8_heads_cycle.pt") in message
    folder = official.official_cache_dir()
    assert not (folder / "8_heads_cycle.pt").exists()
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) == []  # no half-written file


def test_network_failure_names_the_url_and_the_offline_way(env, monkeypatch):
    dead = "http://127.0.0.1:9/nothing-here"  # port 9 (discard): connection refused
    monkeypatch.setenv(official.OFFICIAL_URL_VARIABLE, dead)
    with pytest.raises(RuntimeError, match=f"could not fetch {dead}/1_heads_copy.pt.*--ckpt-dir"):
        official.fetch_official(progress=False, log=lambda *_: None)


@needs_official
def test_main_official_end_to_end(env, tmp_path):
    environment = dict(os.environ)
    result = subprocess.run([sys.executable, "main.py", "--official", "--heads", "16", "--tasks", "cycle", "--out",
                             tmp_path / "out"], cwd=ROOT, capture_output=True, text=True, timeout=300, env=environment)
    assert result.returncode == 0, result.stderr[-3000:]
    fresh = pd.read_csv(tmp_path / "out" / "section4.csv")
    committed = pd.read_csv(ROOT / "results" / "official" / "section4.csv")
    committed = committed[(committed.task == "cycle") & (committed.heads == 16)].reset_index(drop=True)
    assert len(fresh) == 4 and (abs(fresh.fidelity_mean - committed.fidelity_mean) < 1e-3).all()
    clash = subprocess.run([sys.executable, "main.py", "--official", "--quick"], cwd=ROOT, capture_output=True,
                           text=True, timeout=120, env=environment)
    assert clash.returncode == 2 and "cannot be combined with --quick" in clash.stderr
