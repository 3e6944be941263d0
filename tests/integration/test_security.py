"""Security: TLS and mutual TLS, bearer-token authentication, sessions bound to their principal, and model
loading that never unpickles and never leaves the repository."""

from __future__ import annotations

import datetime
import ipaddress
import os
import pickle
import shutil
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import TINY_INPUT, build_tiny_repository

from rnnserve.client import Client, RnnServeError
from rnnserve.manifest import ModelManifest
from rnnserve.server.models.repository import ModelRepository
from rnnserve.server.transport.auth import TokenError, load_tokens, parse_tokens

X = np.ones(TINY_INPUT, np.float32)
ALICE, BOB, ADMIN = "alice-token-0123456789", "bob-token-0123456789ab", "admin-token-0123456789"


# ---- certificates -------------------------------------------------------------------------------------------
def _pem_key():
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _cert(subject: str, key, issuer_name, issuer_key, *, ca: bool, server: bool = False):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name or name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    elif not ca:
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    return builder.sign(issuer_key or key, hashes.SHA256())


def _write(path: Path, cert=None, key=None) -> Path:
    from cryptography.hazmat.primitives import serialization

    if cert is not None:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    else:
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    return path


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    """A CA, a server certificate for localhost/127.0.0.1 and a client certificate, all signed by the CA, plus
    a second CA that signed nothing the server trusts."""
    pytest.importorskip("cryptography")
    d = tmp_path_factory.mktemp("pki")
    ca_key = _pem_key()
    ca = _cert("rnnserve test CA", ca_key, None, None, ca=True)
    server_key, client_key = _pem_key(), _pem_key()
    other_key = _pem_key()
    other_ca = _cert("someone else's CA", other_key, None, None, ca=True)
    return {
        "ca": _write(d / "ca.pem", ca),
        "server_cert": _write(
            d / "server.pem", _cert("localhost", server_key, ca.subject, ca_key, ca=False, server=True)
        ),
        "server_key": _write(d / "server.key", key=server_key),
        "client_cert": _write(d / "client.pem", _cert("client-1", client_key, ca.subject, ca_key, ca=False)),
        "client_key": _write(d / "client.key", key=client_key),
        "stranger_cert": _write(
            d / "stranger.pem", _cert("stranger", client_key, other_ca.subject, other_key, ca=False)
        ),
    }


def _creds(pki, *, client: bool = False, stranger: bool = False) -> grpc.ChannelCredentials:
    cert = pki["stranger_cert"] if stranger else pki["client_cert"]
    return grpc.ssl_channel_credentials(
        root_certificates=pki["ca"].read_bytes(),
        private_key=pki["client_key"].read_bytes() if client or stranger else None,
        certificate_chain=cert.read_bytes() if client or stranger else None,
    )


def _step_once(client: Client) -> int:
    with client.session("gru") as s:
        s.step(X)
        return s.step(X).shape[0]


def test_tls_serves_only_tls(server_factory, tiny_repository, pki):
    server = server_factory(tiny_repository, tls_cert=pki["server_cert"], tls_key=pki["server_key"])
    with Client(server.address, credentials=_creds(pki), timeout=10) as client:
        assert _step_once(client) == 2
        assert client.health() == "SERVING"
    with Client(server.address, timeout=3) as plain, pytest.raises(RnnServeError) as info:
        plain.list_models()
    assert info.value.code == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_requires_a_client_certificate_from_the_ca(server_factory, tiny_repository, pki):
    server = server_factory(
        tiny_repository, tls_cert=pki["server_cert"], tls_key=pki["server_key"], tls_client_ca=pki["ca"]
    )
    with Client(server.address, credentials=_creds(pki, client=True), timeout=10) as client:
        assert _step_once(client) == 2
    for creds in (_creds(pki), _creds(pki, stranger=True)):  # no certificate; one the server's CA did not sign
        with Client(server.address, credentials=creds, timeout=3) as client, pytest.raises(RnnServeError) as info:
            client.list_models()
        assert info.value.code == grpc.StatusCode.UNAVAILABLE


def test_tls_settings_must_be_complete(tiny_repository, pki):
    from rnnserve.server.app import RnnServer
    from rnnserve.server.settings import ServerSettings

    with pytest.raises(ValueError, match="both --tls-cert and --tls-key"):
        RnnServer(ServerSettings(repository=tiny_repository, tls_cert=pki["server_cert"]))
    with pytest.raises(ValueError, match="--tls-client-ca needs"):
        RnnServer(ServerSettings(repository=tiny_repository, tls_client_ca=pki["ca"]))


# ---- tokens and principals -------------------------------------------------------------------------------
@pytest.fixture
def tokens_file(tmp_path) -> Path:
    path = tmp_path / "tokens"
    path.write_text(f"# token principal\n{ALICE} alice\n{BOB}   bob   # trailing comment\n\n")
    return path


@pytest.fixture
def auth_server(server_factory, tiny_repository, tokens_file, monkeypatch):
    # The admin's token comes from the environment, the others from the file.
    return server_factory(tiny_repository, auth_tokens=tokens_file, tokens=f"{ADMIN} ops", admin_principals="ops, root")


def test_parse_tokens():
    assert parse_tokens(f"{ALICE} alice; {BOB} bob\n# x\n", "env") == {ALICE: "alice", BOB: "bob"}
    with pytest.raises(TokenError, match="entry 1: expected 'TOKEN PRINCIPAL'"):
        parse_tokens(ALICE, "env")
    with pytest.raises(TokenError, match="shorter than 16"):
        parse_tokens("short alice", "env")
    with pytest.raises(TokenError, match="two principals"):
        parse_tokens(f"{ALICE} alice; {ALICE} bob", "env")
    assert load_tokens(None, None) == {}


def test_calls_need_a_valid_token_but_health_does_not(auth_server):
    for token in (None, "not-a-valid-token-at-all", ALICE[:-1]):
        with Client(auth_server.address, token=token, timeout=10) as client:
            assert client.health() == "SERVING"  # orchestrators probe without a secret
            with pytest.raises(RnnServeError) as info:
                client.list_models()
            assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
            assert "authorization: Bearer" in info.value.message
            with pytest.raises(RnnServeError) as info:
                list(client.session("gru").stream([X]))
            assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
    with Client(auth_server.address, token=ALICE, timeout=10) as client:
        assert _step_once(client) == 2
        with client.session("gru") as s:
            assert len(list(s.stream(np.ones((3, TINY_INPUT), np.float32)))) == 3
    with Client(auth_server.address, metadata={"authorization": f"bearer {BOB}"}, timeout=10) as client:
        assert client.list_models()  # the scheme is case-insensitive


def test_sessions_belong_to_their_principal(auth_server):
    with (
        Client(auth_server.address, token=ALICE, timeout=10) as alice,
        Client(auth_server.address, token=BOB, timeout=10) as bob,
    ):
        s = alice.session("gru")
        s.step(X)
        sid = s.id
        unknown = "0" * 32

        def not_found(call) -> str:
            with pytest.raises(RnnServeError) as info:
                call()
            assert info.value.code == grpc.StatusCode.NOT_FOUND
            return info.value.message

        stranger = bob._stub  # raw calls on alice's id, with bob's token
        from rnnserve.proto import rnnserve_pb2 as pb
        from rnnserve.tensors import to_proto

        def raw(method, request):
            return lambda: bob._call(method, request)

        step = pb.StepRequest(session_id=sid, inputs={"x": to_proto(X)})
        for method, request in [
            (stranger.Step, step),
            (stranger.GetState, pb.SessionRequest(session_id=sid)),
            (stranger.SetState, pb.SetStateRequest(session_id=sid)),
            (stranger.ResetSession, pb.ResetSessionRequest(session_id=sid)),
            (stranger.CloseSession, pb.SessionRequest(session_id=sid)),
        ]:
            message = not_found(raw(method, request))
            # Exactly what an id that never existed gets: nothing tells bob the session is there.
            request.session_id = unknown
            assert message.replace(sid, unknown) == not_found(raw(method, request))
        with bob.multi_stream() as ms, pytest.raises(RnnServeError) as info:
            ms.step_batch([sid], {"x": X[None]})
        assert info.value.code == grpc.StatusCode.NOT_FOUND
        assert s.get_state()["h"].shape == (1, 5)  # alice's session is untouched...
        assert s.step(X).shape == (2,)
        assert alice.stats().models[0].steps >= 2
        s.close()


def test_load_and_unload_need_an_admin_principal(auth_server):
    with Client(auth_server.address, token=ALICE, timeout=30) as alice, pytest.raises(RnnServeError) as info:
        alice.load_model("gru")
    assert info.value.code == grpc.StatusCode.PERMISSION_DENIED and "alice" in info.value.message
    with Client(auth_server.address, token=ADMIN, timeout=30) as ops:
        assert [m.state for m in ops.load_model("gru")] == ["READY"]


def test_sessions_per_principal(server_factory, tiny_repository, tokens_file):
    server = server_factory(tiny_repository, auth_tokens=tokens_file, max_sessions_per_client=1)
    with (
        Client(server.address, token=ALICE, timeout=10) as alice,
        Client(server.address, token=BOB, timeout=10) as bob,
    ):
        a = alice.session("gru")
        with pytest.raises(RnnServeError) as info:
            alice.session("gru")
        assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "'alice'" in info.value.message
        bob.session("gru").close()  # bob has his own allowance
        a.close()
        alice.session("gru").close()


def test_bad_token_file_stops_the_server(tmp_path, tiny_repository):
    from rnnserve.server.app import RnnServer
    from rnnserve.server.settings import ServerSettings

    bad = tmp_path / "tokens"
    bad.write_text("only-one-field-here-0123\n")
    with pytest.raises(TokenError, match="expected 'TOKEN PRINCIPAL'"):
        RnnServer(ServerSettings(repository=tiny_repository, auth_tokens=bad))


# ---- model loading: no pickle, no escaping the repository -----------------------------------------------------
class _Marker:
    """Unpickling this creates a file: proof that a loader ran pickle."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.makedirs, (self.path,))


def test_pickle_artifacts_and_state_files_are_never_unpickled(tmp_path):
    import torch

    repo = build_tiny_repository(tmp_path / "repo")
    marker = tmp_path / "unpickled"
    # A torch.save file (a pickle inside a zip) named as the TorchScript artifact.
    ts_dir = repo / "gru_ts" / "1"
    torch.save({"weights": _Marker(str(marker))}, ts_dir / "model.pt")
    # An object-dtype .npy (a pickle) as an initial state file.
    onnx_dir = repo / "gru" / "1"
    with open(onnx_dir / "h0.npy", "wb") as f:
        np.lib.format.write_array(f, np.array([_Marker(str(marker))], dtype=object), allow_pickle=True)
    manifest = ModelManifest.read(onnx_dir).model_dump(mode="json")
    manifest["states"][0]["initial"] = {"kind": "file", "path": "h0.npy"}
    ModelManifest.model_validate(manifest).write(onnx_dir)
    # A pickle file that claims to be ONNX.
    fake_dir = repo / "fake" / "1"
    fake_dir.mkdir(parents=True)
    (fake_dir / "model.onnx").write_bytes(pickle.dumps(_Marker(str(marker))))
    manifest["name"], manifest["states"][0]["initial"] = "fake", {"kind": "zeros"}
    ModelManifest.model_validate(manifest).write(fake_dir)

    repository = ModelRepository(repo)
    repository.load_all()
    assert not repository.models
    assert set(repository.failed) == {("gru", 1), ("gru_ts", 1), ("fake", 1)}
    assert "pickle" in repository.failed[("gru", 1)].error.lower()
    assert not marker.exists()


def test_startup_scan_skips_folders_that_resolve_outside(tmp_path):
    outside = build_tiny_repository(tmp_path / "outside")
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copytree(outside / "gru", repo / "gru")
    (repo / "linked_model").symlink_to(outside / "gru_ts", target_is_directory=True)  # a model folder out
    (repo / "gru" / "2").symlink_to(outside / "gru" / "1", target_is_directory=True)  # a version folder out
    repository = ModelRepository(repo)
    repository.load_all()
    assert set(repository.models) == {("gru", 1)}
    assert not repository.failed


@pytest.mark.parametrize("name", ["model.onnx", "manifest.json"])
def test_a_file_symlinked_out_of_the_version_folder_is_refused(tmp_path, name: str):
    outside = build_tiny_repository(tmp_path / "outside")
    repo = tmp_path / "repo"
    shutil.copytree(outside / "gru", repo / "gru")
    link = repo / "gru" / "1" / name
    link.unlink()
    link.symlink_to(outside / "gru" / "1" / name)
    repository = ModelRepository(repo)
    repository.load_all()
    assert not repository.models
    assert f"{name} resolves outside" in repository.failed[("gru", 1)].error


def test_kserve_sequences_need_a_token_and_stay_with_their_principal(auth_server):
    tritonclient = pytest.importorskip("tritonclient.grpc")
    from tritonclient.utils import InferenceServerException

    def infer(token: str | None, **kw):
        client = tritonclient.InferenceServerClient(auth_server.address)
        inp = tritonclient.InferInput("x", [1, TINY_INPUT], "FP32")
        inp.set_data_from_numpy(X[None])
        headers = {"authorization": f"Bearer {token}"} if token else None
        try:
            return client.infer("gru", [inp], sequence_id=77, headers=headers, **kw).as_numpy("y")
        finally:
            client.close()

    with pytest.raises(InferenceServerException) as info:
        infer(None, sequence_start=True)
    assert info.value.status() == "StatusCode.UNAUTHENTICATED"
    assert infer(ALICE, sequence_start=True).shape == (1, 2)
    assert infer(ALICE).shape == (1, 2)  # alice's sequence goes on...
    with pytest.raises(InferenceServerException):
        infer(BOB)  # ...and is not bob's to continue
    assert infer(ALICE, sequence_end=True).shape == (1, 2)


def test_triton_repository_control_needs_an_admin_principal(auth_server):
    import tritonclient.grpc as triton
    from tritonclient.utils import InferenceServerException

    client = triton.InferenceServerClient(auth_server.address)
    for call in (client.load_model, client.unload_model):
        with pytest.raises(InferenceServerException) as info:
            call("gru", headers={"authorization": f"Bearer {ALICE}"})
        assert info.value.status() == "StatusCode.PERMISSION_DENIED", info.value
    client.load_model("gru", headers={"authorization": f"Bearer {ADMIN}"})
    assert client.is_model_ready("gru", headers={"authorization": f"Bearer {ALICE}"})
