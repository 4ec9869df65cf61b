"""Admin bearer token (optionally for every RPC), TLS and mutual TLS with throwaway
certificates, and tokens never in logs."""

from __future__ import annotations

import logging
import shutil
import subprocess

import grpc
import pytest

from recserve.clients.client import RecommenderClient, RecserveError
from tests.service_helpers import publish_models, running

TOKEN = "s3cret-token-value"


@pytest.fixture(scope="module")
def models(small, tmp_path_factory):
    root = tmp_path_factory.mktemp("sec-models")
    publish_models(small, root)
    return root


@pytest.mark.parametrize("server", ["asyncio", "threads"])
def test_admin_needs_the_token(models, caplog, server):
    caplog.set_level(logging.DEBUG)
    with running(models, admin_token=TOKEN, server=server) as s:
        for token in ("", "wrong", TOKEN[:-1]):
            with RecommenderClient(s.target, token=token) as rc, pytest.raises(RecserveError) as e:
                rc.models()
            assert e.value.code == "UNAUTHENTICATED" and e.value.message.startswith("authorization")
            with pytest.raises(RecserveError) as e:
                RecommenderClient(s.target, token=token).reload()
            assert e.value.code == "UNAUTHENTICATED"
        with RecommenderClient(s.target, token=TOKEN) as rc:
            assert {m.name for m in rc.models()} >= {"als", "popularity"}
            assert rc.reload() == ([], [])
        with RecommenderClient(s.target) as rc:  # Recommender RPCs stay open by default
            assert len(rc.recommend("7", 3).items) == 3
    assert TOKEN not in caplog.text


@pytest.mark.parametrize("server", ["asyncio", "threads"])
def test_token_for_all_rpcs(models, server):
    with running(models, admin_token=TOKEN, token_for_all=True, server=server) as s:
        with RecommenderClient(s.target) as rc, pytest.raises(RecserveError) as e:
            rc.recommend("7", 3)
        assert e.value.code == "UNAUTHENTICATED"
        with RecommenderClient(s.target, token=TOKEN) as rc:
            assert len(rc.recommend("7", 3).items) == 3
        # Health stays open: probes carry no token.
        from recserve.clients.health import check

        assert check(s.target) == "SERVING"


def openssl(*args: str, cwd) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """A throwaway CA, a server certificate for localhost and a client certificate."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: cannot make test certificates")
    d = tmp_path_factory.mktemp("certs")
    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=test-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        cwd=d,
    )
    for name, cn in (("server", "localhost"), ("client", "test-client")):
        openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            f"/CN={cn}",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            cwd=d,
        )
        (d / f"{name}.ext").write_text(
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"
            if name == "server"
            else "extendedKeyUsage=clientAuth\n"
        )
        openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-out",
            f"{name}.pem",
            "-extfile",
            f"{name}.ext",
            cwd=d,
        )
    return d


@pytest.mark.parametrize("server", ["asyncio", "threads"])
def test_tls_and_mutual_tls(models, certs, server):
    tls = {"tls_cert": str(certs / "server.pem"), "tls_key": str(certs / "server.key")}
    with running(models, server=server, **tls) as s:
        target = f"localhost:{s.app.port}"
        with RecommenderClient(target, tls_ca=str(certs / "ca.pem")) as rc:
            assert len(rc.recommend("7", 3).items) == 3
        from recserve.clients.health import check

        assert check(target, tls_ca=str(certs / "ca.pem")) == "SERVING"
        with RecommenderClient(target, deadline=2) as rc, pytest.raises(RecserveError) as e:
            rc.recommend("7", 3)  # plaintext against a TLS port
        assert e.value.code in ("UNAVAILABLE", "DEADLINE_EXCEEDED")
    with running(models, server=server, tls_client_ca=str(certs / "ca.pem"), **tls) as s:
        target = f"localhost:{s.app.port}"
        with RecommenderClient(target, tls_ca=str(certs / "ca.pem"), deadline=2) as rc:
            with pytest.raises(RecserveError) as e:
                rc.recommend("7", 3)  # no client certificate
            assert e.value.code in ("UNAVAILABLE", "DEADLINE_EXCEEDED")
        with RecommenderClient(
            target,
            tls_ca=str(certs / "ca.pem"),
            tls_cert=str(certs / "client.pem"),
            tls_key=str(certs / "client.key"),
        ) as rc:
            assert len(rc.recommend("7", 3).items) == 3


def test_tls_config_errors_name_the_key(tmp_path):
    from recserve.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="tls_cert / tls_key"):
        load_config(None, env={"RECSERVE_TLS_CERT": "x.pem"})
    with pytest.raises(ConfigError, match=r"tls_cert: .* is not a file"):
        load_config(None, env={"RECSERVE_TLS_CERT": "x.pem", "RECSERVE_TLS_KEY": "x.key"})
    with pytest.raises(ConfigError, match="token_for_all"):
        load_config(None, env={"RECSERVE_TOKEN_FOR_ALL": "true"})
    assert grpc  # the module is used by the helpers above
