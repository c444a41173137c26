"""The registry against a real etcd that requires TLS, client certificates
and users: servers register and clients resolve through it; a client
without the right credentials gets a typed error naming what is wrong."""

from __future__ import annotations

import datetime
import ipaddress
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from servers import Echo

from pylm.errors import RegistryAccessDenied, RegistryError, RegistryUnavailable
from pylm.registry import InstanceRecord, LocalEtcd, Registry, RegistryConfig
from pylm.registry.local import EtcdTLS
from pylm.standalone import Client

pytestmark = pytest.mark.timeout(60)


class Authority:
    """A throw-away certificate authority writing PEM files to a folder."""

    def __init__(self, folder: Path, name: str) -> None:
        self.folder = folder
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.name = subject
        self.certificate = (
            self._builder(subject, self.key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.cacert = self._write(f"{name}.pem", self.certificate)

    def _builder(
        self, subject: x509.Name, public_key: ec.EllipticCurvePublicKey
    ) -> x509.CertificateBuilder:
        now = datetime.datetime.now(datetime.UTC)
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(getattr(self, "name", subject))
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
        )

    def _write(self, filename: str, certificate: x509.Certificate) -> str:
        path = self.folder / filename
        path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        return str(path)

    def issue(self, common_name: str) -> tuple[str, str]:
        """A certificate for ``common_name`` (also valid for 127.0.0.1) and its key."""
        key = ec.generate_private_key(ec.SECP256R1())
        certificate = (
            self._builder(
                x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]), key.public_key()
            )
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [x509.ExtendedKeyUsageOID.SERVER_AUTH, x509.ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )
        key_path = self.folder / f"{common_name}-key.pem"
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return self._write(f"{common_name}.pem", certificate), str(key_path)


@pytest.fixture(scope="module")
def authority(tmp_path_factory: pytest.TempPathFactory) -> Authority:
    return Authority(tmp_path_factory.mktemp("pki"), "pylm-test-ca")


@pytest.fixture(scope="module")
def tls_etcd(authority: Authority) -> Iterator[LocalEtcd]:
    """etcd speaking only TLS, requiring client certificates and users."""
    cert, key = authority.issue("etcd")
    etcd = LocalEtcd(tls=EtcdTLS(authority.cacert, cert, key, client_cert_auth=True))
    etcd.start()
    try:
        etcd.enable_auth("root-password")
        yield etcd
    finally:
        etcd.cleanup()


@pytest.fixture(scope="module")
def auth_etcd() -> Iterator[LocalEtcd]:
    """etcd requiring users, with auth tokens living one second."""
    etcd = LocalEtcd(extra_args=["--auth-token-ttl", "1"])
    etcd.start()
    try:
        etcd.enable_auth("s3cret:pw")
        yield etcd
    finally:
        etcd.cleanup()


def test_tls_urls_parse_and_name_their_files(tmp_path: Path) -> None:
    config = RegistryConfig.parse("etcds://10.0.0.1:2379")
    assert config.tls and config.cacert is None and config.url == "etcds://10.0.0.1:2379"
    config = RegistryConfig.parse("etcd://h:1?cacert=/a/ca.pem&cert=/a/c.pem&key=/a/k.pem")
    assert (config.tls, config.cacert, config.cert, config.key) == (
        True,
        "/a/ca.pem",
        "/a/c.pem",
        "/a/k.pem",
    )
    assert RegistryConfig.parse(config.url) == config
    with pytest.raises(RegistryError, match="needs both cert= and key="):
        RegistryConfig.parse("etcds://h:1?cert=/a/c.pem")
    with pytest.raises(RegistryError, match="unknown parameter 'ca'"):
        RegistryConfig.parse("etcds://h:1?ca=/a/c.pem")
    missing = tmp_path / "nope.pem"
    with pytest.raises(RegistryError, match=f"cacert file '{missing}'"):
        with Registry(f"etcds://127.0.0.1:1?cacert={missing}", cluster="x") as registry:
            registry.instances()


def test_servers_and_clients_over_tls_with_client_certificates(
    tls_etcd: LocalEtcd, authority: Authority, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYLM_CLUSTER", "tls")
    cert, key = authority.issue("root")  # etcd takes the user from the common name
    url = f"{tls_etcd.url}&cert={cert}&key={key}"
    with Registry(url, cluster="tls") as registry:
        with Echo("echo", registry=registry, log_stdout=False):
            with Client("echo", registry=url, timeout=10) as client:
                assert client.job("echo", b"over tls") == b"over tls"
            (found,) = registry.instances("echo")
            assert found.kind == "standalone"


def test_tls_without_client_certificate_or_trusted_ca_is_refused(
    tls_etcd: LocalEtcd, authority: Authority, tmp_path: Path
) -> None:
    with pytest.raises(RegistryUnavailable, match=r"cannot be reached \(127\.0\.0\.1:"):
        with Registry(tls_etcd.url, cluster="tls", timeout=2) as registry:
            registry.instances()
    stranger = Authority(tmp_path, "stranger-ca")
    cert, key = stranger.issue("root")
    url = f"etcds://127.0.0.1:{tls_etcd.client_port}?cacert={stranger.cacert}&cert={cert}&key={key}"
    with pytest.raises(RegistryUnavailable, match="cannot be reached"):
        with Registry(url, cluster="tls", timeout=2) as registry:
            registry.instances()
    plain = f"etcd://127.0.0.1:{tls_etcd.client_port}"  # TLS port, plain client
    with pytest.raises(RegistryUnavailable):
        with Registry(plain, cluster="tls", timeout=2) as registry:
            registry.instances()


def test_user_and_password(auth_etcd: LocalEtcd, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYLM_CLUSTER", "auth")
    good = auth_etcd.url.replace("etcd://", "etcd://root:s3cret%3Apw@")
    with Registry(good, cluster="auth") as registry:
        with Echo("echo", registry=registry, log_stdout=False):
            with Client("echo", registry=good, timeout=10) as client:
                assert client.job("echo", b"with a password") == b"with a password"
    for url, who in [
        (auth_etcd.url, "a client without user:password"),
        (auth_etcd.url.replace("etcd://", "etcd://root:wrong@"), "user 'root'"),
        (auth_etcd.url.replace("etcd://", "etcd://nobody:x@"), "user 'nobody'"),
    ]:
        with pytest.raises(RegistryAccessDenied, match=f"refused {who}"):
            with Registry(url, cluster="auth", timeout=3) as registry:
                registry.instances()
        with pytest.raises(RegistryAccessDenied, match=f"refused {who}"):
            Echo("echo", registry=url, log_stdout=False).start(background=True)


def test_a_user_limited_to_pylm_keys(auth_etcd: LocalEtcd) -> None:
    """What registry/README.md tells operators to grant is enough, and a
    user without it is refused by name."""
    auth_etcd.add_user("pylm", "pw")
    auth_etcd.add_user("other", "pw", prefix="/elsewhere/")
    url = auth_etcd.url.replace("etcd://", "etcd://pylm:pw@")
    with Registry(url, cluster="limited") as registry:
        registry.set_config("step1", next="step2.bar")
        with Echo("echo", registry=registry, log_stdout=False) as server:
            (found,) = registry.instances("echo")
            assert found.endpoints == {"rep": server.address}
            assert set(registry.leases_left("echo")) == {found.instance}
    stranger = auth_etcd.url.replace("etcd://", "etcd://other:pw@")
    with pytest.raises(RegistryAccessDenied, match=r"refused user 'other'.*permission denied"):
        with Registry(stranger, cluster="limited", timeout=3) as registry:
            registry.instances()


def test_expired_auth_tokens_are_renewed(auth_etcd: LocalEtcd) -> None:
    """Tokens live 1 s here (etcd extends them on each use): a client idle
    for longer logs in again by itself, and its registration survives."""
    url = auth_etcd.url.replace("etcd://", "etcd://root:s3cret%3Apw@")
    with Registry(url, cluster="tokens") as registry:
        registration = registry.register(
            InstanceRecord("echo", "standalone", {"rep": "tcp://127.0.0.1:1"}), ttl=30
        )
        assert registry._client is not None
        first = registry._client.metadata
        time.sleep(2.5)  # idle past the token's life: the behaviour under test, not a sync
        registry.set_config("echo", next="other.f")
        assert [found.name for found in registry.instances("echo")] == ["echo"]
        assert registry.get_config("echo") == {"next": "other.f"}
        assert registry._client.metadata != first
        assert registration.failures == 0 and registration.registered
