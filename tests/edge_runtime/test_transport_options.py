"""The device's connection settings: local mistakes are fatal ConfigErrors, never retried as network errors."""

import logging
import ssl
import subprocess

import pytest

from flexsfl.core.errors import ConfigError
from flexsfl.edge_runtime.transport import ClientOptions, _ssl_context


def test_client_id_is_checked_as_the_wire_does():
    for bad in ("x;y", "a b", "", "-x", "x" * 129):
        with pytest.raises(ConfigError, match="client id"):
            ClientOptions(server="ws://127.0.0.1:1", client_id=bad, token="t")
    ClientOptions(server="ws://127.0.0.1:1", client_id="pi-7.k_2", token="t")


def test_plain_ws_off_loopback_warns(caplog):
    with caplog.at_level(logging.WARNING, "flexsfl.edge"):
        for url in ("ws://127.0.0.1:8765", "ws://localhost:1", "ws://[::1]:1"):
            assert _ssl_context(ClientOptions(server=url, client_id="a", token="t")) is None
        assert "in clear" not in caplog.text
        _ssl_context(ClientOptions(server="ws://10.0.0.7:8765", client_id="a", token="t"))
    assert "10.0.0.7" in caplog.text and "in clear" in caplog.text and "wss://" in caplog.text


def test_ca_file(tmp_path):
    with pytest.raises(ConfigError, match="--ca-file is for wss://"):
        ClientOptions(server="ws://10.0.0.7:1", client_id="a", token="t", ca_file="ca.pem")
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate")
    with pytest.raises(ConfigError, match="bad.pem: cannot load the CA certificates"):
        _ssl_context(ClientOptions(server="wss://h:1", client_id="a", token="t", ca_file=str(bad)))
    key, crt = tmp_path / "k.pem", tmp_path / "c.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(crt),
                    "-days", "1", "-subj", "/CN=flexsfl-test-ca"], check=True, capture_output=True)
    ctx = _ssl_context(ClientOptions(server="wss://h:1", client_id="a", token="t", ca_file=str(crt)))
    assert isinstance(ctx, ssl.SSLContext) and any(c["subject"] == ((("commonName", "flexsfl-test-ca"),),)
                                                   for c in ctx.get_ca_certs())
