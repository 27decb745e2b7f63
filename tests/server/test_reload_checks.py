"""Reloads that fail closed (issue 18, items 6 and 7, and the metrics thread bound): a TLS
certificate that is expired, not yet valid or does not match its key is refused and the old
one stays, with the reason in the log and a metric, and a gauge of the seconds left; an
emptied token file revokes every token, a missing one keeps the last list for a short grace
(a Secret's symlink swap) and then refuses every call; the metrics endpoint bounds its
threads."""

from __future__ import annotations

import datetime
import logging
import os
import socket
import threading
import time
import urllib.request

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gramstyle.server import metrics as metrics_module
from gramstyle.server.metrics import Metrics
from gramstyle.server.security import TlsFiles, TokenStore

NOW = datetime.datetime.now(datetime.timezone.utc)  # noqa: UP017 -- Python 3.10


def _key():
    return ec.generate_private_key(ec.SECP256R1())


def _cert(key, start: datetime.datetime, end: datetime.datetime) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@pytest.fixture
def tls(tmp_path):
    key = _key()
    cert, key_path = tmp_path / "server.crt", tmp_path / "server.key"
    cert.write_bytes(_cert(key, NOW - datetime.timedelta(hours=1),
                           NOW + datetime.timedelta(days=2)))
    key_path.write_bytes(_key_pem(key))
    return TlsFiles(cert, key_path), key


DAY = datetime.timedelta(days=1)


@pytest.mark.parametrize("window, reason, message", [
    ((-2 * DAY, -DAY), "expired", "expired at"),
    ((DAY, 2 * DAY), "not_yet_valid", "is not valid yet"),
    (None, "key_mismatch", "it is not the private key of the certificate"),
])
def test_tls_reload_refuses_a_bad_certificate(tls, caplog, window, reason, message):
    files, key = tls
    served = files.not_after
    metrics = Metrics()
    metrics.watch_tls(files)
    left = metrics.registry.get_sample_value("gramstyle_tls_certificate_expiry_seconds")
    # The certificate ends 2 days after NOW (set when this module was collected, which in a
    # full run can be many minutes before this test): the gauge counts down to it.
    assert abs(left - (served - time.time())) < 120 and left <= 2 * 86400
    if window is None:  # a valid certificate for another key
        files.cert.write_bytes(_cert(_key(), NOW - DAY, NOW + DAY))
    else:
        files.cert.write_bytes(_cert(key, NOW + window[0], NOW + window[1]))
    with caplog.at_level(logging.ERROR, "gramstyle.server.security"):
        assert files.reload() is False
    assert files.not_after == served  # the old one stays
    assert f"TLS files not reloaded ({reason})" in caplog.text
    assert message in caplog.text
    assert metrics.registry.get_sample_value("gramstyle_tls_reload_failures_total",
                                             {"reason": reason}) == 1
    assert files._fetch() is None  # gRPC keeps serving the old certificate


def test_tls_start_refuses_an_expired_certificate(tmp_path):
    key = _key()
    (tmp_path / "c.pem").write_bytes(_cert(key, NOW - 2 * DAY, NOW - DAY))
    (tmp_path / "k.pem").write_bytes(_key_pem(key))
    with pytest.raises(ValueError, match=r"^tls_cert: '.*c\.pem' expired at \d{4}-"):
        TlsFiles(tmp_path / "c.pem", tmp_path / "k.pem")


def test_tls_reload_takes_a_valid_certificate(tls):
    files, key = tls
    files.cert.write_bytes(_cert(key, NOW - DAY, NOW + 30 * DAY))
    assert files.reload() is True
    assert abs(files.not_after - (NOW + 30 * DAY).timestamp()) < 2
    assert files._fetch() is not None


BEARER = "Bearer good-token"


def test_emptied_token_file_revokes_every_token(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr("gramstyle.server.security.CHANGE_CHECK_INTERVAL_S", 0.0)
    path = tmp_path / "tokens.txt"
    path.write_text("good-token\n")
    store = TokenStore(path)
    assert store.accepts(BEARER)
    path.write_text("# every token revoked\n")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    with caplog.at_level(logging.WARNING, "gramstyle.server.security"):
        assert not store.accepts(BEARER)
    assert len(store) == 0
    assert "no bearer token in" in caplog.text
    path.write_text("good-token\n")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 2 * 10**9))
    assert store.accepts(BEARER)


def test_missing_token_file_fails_closed_after_the_grace(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr("gramstyle.server.security.CHANGE_CHECK_INTERVAL_S", 0.0)
    path = tmp_path / "tokens.txt"
    path.write_text("good-token\n")
    store = TokenStore(path, grace_s=0.5)
    assert store.accepts(BEARER)
    path.unlink()
    with caplog.at_level(logging.ERROR, "gramstyle.server.security"):
        assert store.accepts(BEARER)  # within the grace: a Secret's swap in progress
        time.sleep(0.6)
        assert not store.accepts(BEARER)  # then closed
        assert not store.accepts(BEARER)
    assert "every token is revoked until it is back" in caplog.text
    path.write_text("good-token\n")
    assert store.accepts(BEARER)


def test_kubernetes_secret_swap_keeps_the_tokens(tmp_path, monkeypatch):
    """A Secret volume: tokens.txt -> ..data/tokens.txt, ..data -> ..2026_v1; an update
    writes ..2026_v2 and renames a new ..data link over the old one (atomic)."""
    monkeypatch.setattr("gramstyle.server.security.CHANGE_CHECK_INTERVAL_S", 0.0)
    for version, token in (("v1", "good-token"), ("v2", "next-token")):
        (tmp_path / f"..{version}").mkdir()
        (tmp_path / f"..{version}" / "tokens.txt").write_text(f"{token}\n")
    (tmp_path / "..data").symlink_to("..v1")
    (tmp_path / "tokens.txt").symlink_to("..data/tokens.txt")
    store = TokenStore(tmp_path / "tokens.txt", grace_s=60)
    assert store.accepts(BEARER)
    (tmp_path / "..data_tmp").symlink_to("..v2")
    os.rename(tmp_path / "..data_tmp", tmp_path / "..data")
    assert store.accepts("Bearer next-token")
    assert not store.accepts(BEARER)


def test_metrics_endpoint_bounds_its_threads(monkeypatch):
    monkeypatch.setattr(metrics_module._QuietHandler, "timeout", 1.0)
    port = Metrics().serve_http(0)
    before = threading.active_count()
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(40)]
    try:
        time.sleep(0.3)
        assert threading.active_count() - before <= metrics_module.MAX_SCRAPE_THREADS
        time.sleep(1.5)  # the half-open ones time out, freeing their threads
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
            assert b"gramstyle_memory_budget_bytes 0.0" in answer.read()
    finally:
        for conn in idle:
            conn.close()
