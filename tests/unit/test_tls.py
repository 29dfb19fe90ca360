"""Certificates and TLS contexts, checked with in-memory handshakes (no sockets)."""

from __future__ import annotations

import datetime
import hashlib
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from argon.proxy.tls import TlsConfig, ensure_certificates


def _handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext,
               server_name: str | None) -> tuple[ssl.SSLObject, ssl.SSLObject]:
    s_in, s_out, c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname=server_name)
    done = {"c": False, "s": False}
    for _ in range(20):
        for name, obj in (("c", client), ("s", server)):
            if not done[name]:
                try:
                    obj.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            return server, client
    raise AssertionError("handshake did not finish")


def _client(ca: Path, alpn: bool = True) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca))
    if alpn:
        ctx.set_alpn_protocols(["postgresql"])
    return ctx


def test_generated_certificates(tmp_path: Path) -> None:
    files = ensure_certificates(tmp_path / "tls", "db.example.com")
    assert stat.S_IMODE(files.key.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "tls" / "ca.key").stat().st_mode) == 0o600
    leaf = x509.load_pem_x509_certificate(files.cert.read_bytes())
    key = leaf.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1)
    assert isinstance(leaf.signature_hash_algorithm, hashes.SHA256)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"*.db.example.com", "db.example.com", "localhost"}
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert leaf.not_valid_after_utc > datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=300)


def test_certificates_are_reused_and_leaf_follows_the_domain(tmp_path: Path) -> None:
    first = ensure_certificates(tmp_path, "db.example.com")
    ca, leaf = first.ca_cert.read_bytes(), first.cert.read_bytes()
    again = ensure_certificates(tmp_path, "db.example.com")
    assert again == first
    assert (again.ca_cert.read_bytes(), again.cert.read_bytes()) == (ca, leaf)
    moved = ensure_certificates(tmp_path, "other.example.org")
    assert moved.ca_cert.read_bytes() == ca  # clients keep trusting the same CA
    assert moved.cert.read_bytes() != leaf
    subject = x509.load_pem_x509_certificate(moved.cert.read_bytes()).subject
    assert subject.rfc4514_string() == "CN=*.other.example.org"


def test_broken_leaf_is_reissued(tmp_path: Path) -> None:
    files = ensure_certificates(tmp_path, "db.example.com")
    files.key.write_bytes(b"garbage")
    fixed = ensure_certificates(tmp_path, "db.example.com")
    assert TlsConfig(fixed.cert, fixed.key).end_point is not None


def test_context_alpn_sni_and_channel_binding(tmp_path: Path) -> None:
    files = ensure_certificates(tmp_path, "db.example.com")
    tls = TlsConfig(files.cert, files.key)
    leaf_der = x509.load_pem_x509_certificate(files.cert.read_bytes()).public_bytes(serialization.Encoding.DER)
    assert tls.end_point == hashlib.sha256(leaf_der).digest()
    server, client = _handshake(tls.context(), _client(files.ca_cert), "ep-one.db.example.com")
    assert server.selected_alpn_protocol() == "postgresql"
    served = tls.served(server)
    assert served.server_name == "ep-one.db.example.com"
    assert served.end_point == tls.end_point
    assert client.getpeercert(binary_form=True) == leaf_der


def test_no_sni_serves_the_default_certificate(tmp_path: Path) -> None:
    files = ensure_certificates(tmp_path, "db.example.com")
    tls = TlsConfig(files.cert, files.key)
    client_ctx = _client(files.ca_cert, alpn=False)
    client_ctx.check_hostname = False
    server, _ = _handshake(tls.context(), client_ctx, None)
    assert tls.served(server).server_name is None
    assert tls.served(server).end_point == tls.end_point
    assert server.selected_alpn_protocol() is None


def test_endpoint_address_gets_a_leaf_naming_it(tmp_path: Path) -> None:
    """A connection on an endpoint's own address (no SNI: clients send none for an IP) is served a
    leaf for that address from the same CA, so a client checking the host against the CA accepts
    it; channel binding hashes the leaf actually served. Other addresses get the default leaf."""
    files = ensure_certificates(tmp_path, "db.example.com")
    assert files.ca_key is not None
    tls = TlsConfig(files.cert, files.key, issuer=(files.ca_cert, files.ca_key))
    for address in ("127.1.0.7", "127.2.3.200"):
        ctx = tls.context(address)
        assert tls.context(address) is ctx  # issued once, then kept
        server, client = _handshake(ctx, _client(files.ca_cert), address)  # check_hostname on: the IP SAN
        der = client.getpeercert(binary_form=True)
        leaf = x509.load_der_x509_certificate(der)
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == [address]
        assert tls.served(server).end_point == hashlib.sha256(der).digest() != tls.end_point
        # a client that names the host gets the certificate for the name, on the same connection address
        server, client = _handshake(tls.context(address), _client(files.ca_cert), "ep-one.db.example.com")
        assert tls.served(server).end_point == tls.end_point == hashlib.sha256(
            client.getpeercert(binary_form=True)).digest()
    for other in ("127.0.0.1", "10.0.0.5", None):
        assert tls.context(other) is tls.context()
    assert TlsConfig(files.cert, files.key).context("127.1.0.7") is not None  # without the CA: the default
    with pytest.raises(ssl.SSLCertVerificationError):  # and the default names no endpoint address
        _handshake(TlsConfig(files.cert, files.key).context("127.1.0.7"), _client(files.ca_cert), "127.1.0.7")


def test_sni_picks_an_extra_certificate_with_alpn(tmp_path: Path) -> None:
    one = ensure_certificates(tmp_path / "one", "db.example.com")
    two = ensure_certificates(tmp_path / "two", "eu.example.org")
    tls = TlsConfig(one.cert, one.key, extra=[(two.cert, two.key)])
    server, client = _handshake(tls.context(), _client(two.ca_cert), "ep-x.eu.example.org")
    assert server.selected_alpn_protocol() == "postgresql"  # ALPN on the per-SNI context too
    der = client.getpeercert(binary_form=True)
    assert der == x509.load_pem_x509_certificate(two.cert.read_bytes()).public_bytes(serialization.Encoding.DER)
    assert tls.served(server).end_point == hashlib.sha256(der).digest()


def test_ed25519_certificate_disables_plus(tmp_path: Path) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, None))
    (tmp_path / "c.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "k.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    assert TlsConfig(tmp_path / "c.pem", tmp_path / "k.pem").end_point is None


def test_unreadable_certificate_is_a_config_error(tmp_path: Path) -> None:
    from argon.errors import ConfigError

    (tmp_path / "c.pem").write_text("nope")
    with pytest.raises(ConfigError, match="cannot load the TLS certificate"):
        TlsConfig(tmp_path / "c.pem", tmp_path / "c.pem")
