"""Admin bearer token (optionally for every RPC), TLS and mutual TLS with throwaway
certificates, and tokens never in logs."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from prometheus_client import CollectorRegistry

from recserve.clients.bench import Load
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
    assert_no_token_in(caplog.text)


def assert_no_token_in(text: str) -> None:
    """No 8-character slice of the token appears (a near-miss token the server
    logged, such as the one missing its last character, would show one)."""
    leaks = {TOKEN[i : i + 8] for i in range(len(TOKEN) - 7)} & {
        text[i : i + 8] for i in range(len(text) - 7)
    }
    assert not leaks, leaks


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


def test_tls_files_that_do_not_load_are_named_before_the_port_is_bound(certs, tmp_path):
    # gRPC refuses bad PEM files only when the port is added, which the server
    # reported as "port: cannot bind" with nothing about the files.
    from recserve.config import ConfigError, load_config

    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    openssl(
        "pkey", "-in", str(certs / "server.key"), "-aes256", "-passout", "pass:secret",
        "-out", str(tmp_path / "encrypted.key"), cwd=tmp_path,
    )  # fmt: skip
    cert, key = str(certs / "server.pem"), str(certs / "server.key")
    for tls_cert, tls_key, says in (
        (str(garbage), key, "do not load as a PEM certificate"),
        (cert, str(garbage), "do not load as a PEM certificate"),
        (cert, str(certs / "client.key"), "do not load as a PEM certificate"),  # not its key
        (cert, str(tmp_path / "encrypted.key"), "encrypted"),  # and no passphrase prompt
    ):
        env = {"RECSERVE_TLS_CERT": tls_cert, "RECSERVE_TLS_KEY": tls_key}
        with pytest.raises(ConfigError, match="tls_cert / tls_key: ") as info:
            load_config(None, env=env)
        assert says in str(info.value) and tls_cert in str(info.value)
    env = {"RECSERVE_TLS_CERT": cert, "RECSERVE_TLS_KEY": key}
    with pytest.raises(ConfigError, match=r"tls_client_ca: .* holds no PEM CA certificate"):
        load_config(None, env={**env, "RECSERVE_TLS_CLIENT_CA": str(garbage)})
    cfg = load_config(None, env={**env, "RECSERVE_TLS_CLIENT_CA": str(certs / "ca.pem")})
    assert cfg.tls_cert == cert


def test_client_tls_files_that_do_not_load_are_named(models, certs, tmp_path, capsys):
    # A garbage CA, or a certificate with another's key, failed every call with
    # UNAVAILABLE "connections to all backends failing"; a client certificate
    # without tls_ca connected in plaintext. The files load first now, and any
    # TLS setting makes the channel TLS (no tls_ca: the system's roots).
    from recserve.clients.health import main as health

    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    ca, cert, key = (str(certs / n) for n in ("ca.pem", "client.pem", "client.key"))
    for kwargs, says in (
        ({"tls_ca": str(garbage)}, "tls_ca: .* holds no PEM CA certificate"),
        ({"tls_ca": ca, "tls_cert": cert, "tls_key": str(certs / "server.key")}, "do not load"),
        ({"tls_ca": ca, "tls_cert": cert}, "tls_cert / tls_key: give both or neither"),
        ({"tls_ca": str(tmp_path / "missing.pem")}, "tls_ca: .* holds no PEM CA certificate"),
    ):
        with pytest.raises(ValueError, match=says):
            RecommenderClient("localhost:1", **kwargs)
    with pytest.raises(SystemExit) as e:
        health(["--target", "localhost:1", "--tls-ca", str(garbage)])
    assert e.value.code == 2 and "holds no PEM CA certificate" in capsys.readouterr().err
    with running(models) as s:  # a plaintext server
        target = f"localhost:{s.app.port}"
        with RecommenderClient(target, deadline=2) as rc:
            assert len(rc.recommend("7", 3).items) == 3
        with RecommenderClient(target, tls_cert=cert, tls_key=key, deadline=2) as rc:
            with pytest.raises(RecserveError) as info:
                rc.recommend("7", 3)  # TLS to a plaintext port: no answer, not plaintext
            assert info.value.code == "UNAVAILABLE"


class FakeContext:
    """A grpc.ServicerContext as far as the thread-pool Admin servicer reads it."""

    def __init__(self, peer: str, metadata=()) -> None:
        self._peer, self._metadata = peer, tuple(metadata)

    def peer(self) -> str:
        return self._peer

    def invocation_metadata(self):
        return self._metadata

    def set_trailing_metadata(self, md) -> None:
        self.trailer = dict(md)

    def abort(self, code, details):
        raise Aborted(code, details, self.trailer)


class Aborted(Exception):
    def __init__(self, code, details, trailer) -> None:
        super().__init__(code, details)
        self.code, self.details = code, details
        st = status_pb2.Status.FromString(trailer["grpc-status-details-bin"])
        info = error_details_pb2.ErrorInfo()
        assert st.details[0].Unpack(info)
        self.reason = info.reason


@pytest.mark.parametrize(
    ("peer", "loopback"),
    [
        ("ipv4:127.0.0.1:5000", True),
        ("ipv4:127.8.9.1:5000", True),
        ("ipv6:[::1]:5000", True),
        ("ipv6:%5B::1%5D:5000", True),
        ("ipv6:[::ffff:127.0.0.1]:5000", True),
        ("unix:/tmp/recserve.sock", True),
        ("ipv4:10.1.2.3:5000", False),
        ("ipv6:[2001:db8::1]:5000", False),
        ("ipv6:[::ffff:10.0.0.1]:5000", False),
        ("", False),
        ("ipv4:not-an-address:1", False),
    ],
)
def test_loopback_peers(peer, loopback):
    from recserve.service.auth import is_loopback_peer

    assert is_loopback_peer(peer) is loopback


def test_admin_without_token_answers_only_loopback_peers(models):
    """No admin_token: a remote peer gets PERMISSION_DENIED naming the setting; a
    loopback peer is served; with a token, the token decides wherever the peer is."""
    from recserve.config import ServerConfig
    from recserve.service import App
    from recserve.service.grpc_threads import Admin

    app = App(
        ServerConfig(models=str(models), port=0, metrics_port=0), registry=CollectorRegistry()
    )
    admin = Admin(app.core)
    with pytest.raises(Aborted) as e:
        admin.ListModels(None, FakeContext("ipv4:10.1.2.3:40000"))
    assert e.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert e.value.reason == "ADMIN_NOT_ALLOWED"
    assert "admin_token" in e.value.details and "RECSERVE_ADMIN_TOKEN" in e.value.details
    with pytest.raises(Aborted):
        admin.ReloadModels(None, FakeContext("ipv6:[2001:db8::7]:40000"))
    assert admin.ListModels(None, FakeContext("ipv4:127.0.0.1:40000")).models == []
    token = App(
        ServerConfig(models=str(models), port=0, metrics_port=0, admin_token=TOKEN),
        registry=CollectorRegistry(),
    )
    remote = FakeContext("ipv4:10.1.2.3:1", [("authorization", f"Bearer {TOKEN}")])
    assert Admin(token.core).ListModels(None, remote).models == []
    with pytest.raises(Aborted) as e:
        Admin(token.core).ListModels(None, FakeContext("ipv4:127.0.0.1:1"))
    assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert e.value.reason == "TOKEN_MISSING"
    with pytest.raises(Aborted) as e:
        Admin(token.core).ListModels(
            None, FakeContext("ipv4:127.0.0.1:1", [("authorization", "Bearer wrong")])
        )
    assert e.value.reason == "TOKEN_INVALID"


def test_admin_over_grpc_from_loopback_without_token(models):
    with running(models) as s, RecommenderClient(s.target) as rc:
        assert {m.name for m in rc.models()} >= {"als", "popularity"}


@pytest.mark.parametrize(("host", "warned"), [("127.0.0.1", False), ("[::]", True)])
def test_start_warns_when_admin_is_reachable_without_a_token(models, caplog, host, warned):
    from recserve.config import ServerConfig
    from recserve.service import App

    caplog.set_level(logging.WARNING, logger="recserve.service")
    cfg = ServerConfig(models=str(models), host=host, port=0, metrics_port=0, server="threads")
    app = App(cfg, registry=CollectorRegistry())
    app.start()
    try:
        said = [r.getMessage() for r in caplog.records if "without admin_token" in r.getMessage()]
        assert bool(said) is warned, said
    finally:
        app.drain(grace=0)


def test_the_shell_client_sends_the_admin_token(models, monkeypatch, capsys):
    # `python -m recserve.clients reload` (and `models`) take --token, or the
    # server's own variable RECSERVE_ADMIN_TOKEN, for a server with admin_token.
    from recserve.clients.__main__ import main

    with running(models, admin_token=TOKEN) as s:
        monkeypatch.delenv("RECSERVE_ADMIN_TOKEN", raising=False)
        assert main(["--target", s.target, "reload"]) == 1
        assert "UNAUTHENTICATED" in capsys.readouterr().err
        assert main(["--target", s.target, "--token", TOKEN, "reload"]) == 0
        monkeypatch.setenv("RECSERVE_ADMIN_TOKEN", TOKEN)
        assert main(["--target", s.target, "models"]) == 0
        assert {json.loads(line)["name"] for line in capsys.readouterr().out.splitlines()} >= {
            "als",
            "popularity",
        }


def test_the_bench_and_the_shell_client_reach_a_server_with_tls_and_tokens(
    models, certs, tmp_path, monkeypatch, capsys
):
    # `recserve bench` and `python -m recserve.clients` had no TLS options, and
    # the bench sent no token: against a TLS server neither connected, and with
    # token_for_all every bench call was UNAUTHENTICATED (its ListModels, which
    # fills --users/--items, said only "cannot reach").
    from recserve.cli import main as cli
    from recserve.clients.__main__ import main as shell

    def bench_rc(args: list[str]) -> int:
        try:
            return cli(["bench", *args])
        except SystemExit as exc:  # `recserve bench` exits with the bench's code
            return int(exc.code)

    monkeypatch.delenv("RECSERVE_ADMIN_TOKEN", raising=False)
    tls = {"tls_cert": str(certs / "server.pem"), "tls_key": str(certs / "server.key")}
    ca = str(certs / "ca.pem")
    with running(models, admin_token=TOKEN, token_for_all=True, **tls) as s:
        target = f"localhost:{s.app.port}"
        calls = s.app.metrics.registry.get_sample_value
        labels = {"method": "Recommend", "code": "OK"}
        before = calls("recserve_rpc_duration_seconds_count", labels) or 0
        bench = ["--target", target, "--requests", "40", "--warmup", "0"]
        bench += ["--processes", "1", "--concurrency", "2", "--model", "als", "--json"]
        assert bench_rc([*bench, "--tls-ca", ca, "--token", TOKEN]) == 0
        got = json.loads(capsys.readouterr().out)["result"]
        assert (got["requests"], got["errors"]) == (40, {})
        assert calls("recserve_rpc_duration_seconds_count", labels) - before == 40
        # Without the token: the listing says why; with ids given, every call is
        # counted as refused.
        assert bench_rc([*bench, "--tls-ca", ca]) == 2
        assert "UNAUTHENTICATED" in capsys.readouterr().err
        assert bench_rc([*bench, "--tls-ca", ca, "--users", "1:50", "--items", "1:50"]) == 0
        assert json.loads(capsys.readouterr().out)["result"]["errors"] == {"UNAUTHENTICATED": 40}
        # The token from the server's own variable, as the shell client takes it.
        monkeypatch.setenv("RECSERVE_ADMIN_TOKEN", TOKEN)
        assert bench_rc([*bench, "--tls-ca", ca, "--rpc", "similar"]) == 0
        assert json.loads(capsys.readouterr().out)["result"]["errors"] == {}
        monkeypatch.delenv("RECSERVE_ADMIN_TOKEN")
        ask = ["--target", target, "--tls-ca", ca, "--token", TOKEN]
        assert shell([*ask, "recommend", "--user", "7", "--k", "3", "--model", "als"]) == 0
        assert len(json.loads(capsys.readouterr().out)["items"]) == 3
        assert shell([*ask[:2], "--token", TOKEN, "recommend", "--user", "7"]) != 0  # plaintext
        capsys.readouterr()
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    assert bench_rc(["--target", "localhost:1", "--tls-ca", str(garbage)]) == 2
    assert "tls_ca: " in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        shell(["--target", "localhost:1", "--tls-ca", str(garbage), "recommend", "--user", "7"])
    assert e.value.code == 2 and "holds no PEM CA certificate" in capsys.readouterr().err
    assert_no_token_in(repr(Load(token=TOKEN)))
