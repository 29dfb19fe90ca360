"""TLS for the Postgres front door: certificates generated on first start, and the server contexts.

`ensure_certificates` keeps a local CA and an ECDSA P-256 / SHA-256 leaf for `*.<domain>`,
`<domain>`, `localhost` and 127.0.0.1 in a directory (keys 0600), reused while valid; the leaf is
re-issued when the domain changes or it nears expiry. Not Ed25519: libpq's channel binding cannot
hash such a certificate (design-review §1.7). `TlsConfig` builds the `ssl.SSLContext`s: ALPN
`postgresql` on every context (libpq's direct SSL requires it), the SNI captured per connection, and
the tls-server-end-point bytes of the leaf each context serves, for SCRAM-SHA-256-PLUS.

With the CA at hand (`issuer`), a connection that arrives on an endpoint's own loopback address
(127.1.X.Y, 127.2.X.Y: ADR 0031) and sends no SNI is served a leaf naming that address, issued by
the same CA on its first use and kept in memory: `sslmode=verify-full` against `<data>/tls/ca.crt`
works in the address form too, and so does node-postgres, which verifies the host for
`sslmode=require`. A client that sends SNI gets the certificate for the name, as before.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import ssl
import tempfile
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from argon.errors import ConfigError
from argon.wire.scram import tls_server_end_point

log = logging.getLogger(__name__)

ALPN = "postgresql"
_CA_DAYS = 3650
_LEAF_DAYS = 397
_RENEW_BEFORE = datetime.timedelta(days=30)
_ADDRESS_CONTEXTS = 4096  # per-address contexts kept (least recently used go first)


@dataclass(frozen=True)
class TlsFiles:
    ca_cert: Path
    cert: Path
    key: Path
    ca_key: Path | None = None


@dataclass(frozen=True)
class ServedCert:
    """What a connection learnt in its TLS handshake (read back from the SSL object)."""

    server_name: str | None
    end_point: bytes | None  # tls-server-end-point of the leaf served; None: no SCRAM-PLUS


class TlsConfig:
    """Server-side TLS: a default certificate plus optional ones picked by SNI suffix."""

    def __init__(self, cert: Path | str, key: Path | str, *, alpn: bool = True,
                 extra: Sequence[tuple[Path | str, Path | str]] = (),
                 issuer: tuple[Path, Path] | None = None) -> None:
        self.cert = Path(cert)
        self.key = Path(key)
        self.alpn = alpn
        self.issuer = issuer  # (CA certificate, CA key): leaves for endpoint addresses, issued on first use
        self._by_address: OrderedDict[str, ssl.SSLContext] = OrderedDict()
        self._signing: tuple[x509.Certificate, ec.EllipticCurvePrivateKey, ec.EllipticCurvePrivateKey,
                             datetime.datetime] | None = None
        self._end_points: dict[int, bytes | None] = {}
        self._by_name: list[tuple[str, ssl.SSLContext]] = []
        self._default = self._load(self.cert, self.key)
        for extra_cert, extra_key in extra:
            ctx = self._load(Path(extra_cert), Path(extra_key))
            for name in _dns_names(Path(extra_cert)):
                self._by_name.append((name.lower().removeprefix("*."), ctx))
        self._by_name.sort(key=lambda item: -len(item[0]))  # most specific suffix first

    @property
    def end_point(self) -> bytes | None:
        """tls-server-end-point of the default certificate."""
        return self._end_points[id(self._default)]

    def context(self, local_address: str | None = None) -> ssl.SSLContext:
        """The context for a connection that arrived on `local_address`: one whose leaf names that
        address when it is an endpoint's own (and the CA is at hand), else the default."""
        ctx = self.cached(local_address)
        if ctx is None:
            assert local_address is not None
            ctx = self.remember(local_address, self.issue(local_address))
        return ctx

    def cached(self, local_address: str | None) -> ssl.SSLContext | None:
        """`context` without issuing: None when a leaf for the address must be issued first (`issue`,
        ~5-15 ms of signing and loading: the proxy does it in a thread, then `remember`s it)."""
        if self.issuer is None or not _endpoint_address(local_address):
            return self._default
        assert local_address is not None
        ctx = self._by_address.get(local_address)
        if ctx is not None:
            self._by_address.move_to_end(local_address)
        return ctx

    def issue(self, local_address: str) -> ssl.SSLContext:
        """A context whose leaf names the address (any thread; the default if it cannot be made)."""
        try:
            return self._address_context(local_address)
        except (OSError, ValueError, ssl.SSLError) as exc:  # the CA moved away: the default still serves
            log.warning("cannot issue a certificate for %s: %s", local_address, exc)
            return self._default

    def remember(self, local_address: str, ctx: ssl.SSLContext) -> ssl.SSLContext:
        """Keep an issued context for the address (the event loop's thread), the oldest going first."""
        if ctx is not self._default:
            self._by_address[local_address] = ctx
            if len(self._by_address) > _ADDRESS_CONTEXTS:
                _, old = self._by_address.popitem(last=False)
                self._end_points.pop(id(old), None)
        return ctx

    def _address_context(self, address: str) -> ssl.SSLContext:
        """A leaf for one address, on the default leaf's key, valid as long as the default leaf."""
        if self._signing is None:  # parsed once: the files do not change while the proxy runs
            assert self.issuer is not None
            ca_cert = x509.load_pem_x509_certificate(self.issuer[0].read_bytes())
            ca_key = serialization.load_pem_private_key(self.issuer[1].read_bytes(), password=None)
            key = serialization.load_pem_private_key(self.key.read_bytes(), password=None)
            if not isinstance(ca_key, ec.EllipticCurvePrivateKey) or not isinstance(key, ec.EllipticCurvePrivateKey):
                raise ValueError("the CA and the leaf keys must be ECDSA keys")
            until = x509.load_pem_x509_certificate(self.cert.read_bytes()).not_valid_after_utc
            self._signing = (ca_cert, ca_key, key, until)
        ca_cert, ca_key, key, until = self._signing
        now = datetime.datetime.now(datetime.UTC)
        days = max(1, (until - now).days)
        leaf = _leaf(ca_cert, ca_key, key, address, [x509.IPAddress(ipaddress.ip_address(address))], now, days)
        # load_cert_chain reads files only: the certificate (public) goes through a temporary file
        with tempfile.NamedTemporaryFile(prefix="argon-leaf-", suffix=".crt") as tmp:
            tmp.write(leaf.public_bytes(serialization.Encoding.PEM))
            tmp.flush()
            return self._load(Path(tmp.name), self.key)

    def _load(self, cert: Path, key: Path) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.sni_callback = self._on_sni
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        # no renegotiation: after login the C relay drives the session's SSL (native.py), with no
        # Python callbacks expected
        ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
        # no TLS 1.3 session tickets: libpq never resumes a session, and each ticket costs every
        # handshake an encryption and a record on the wire (OpenSSL sends two by default)
        ctx.num_tickets = 0
        try:
            ctx.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load the TLS certificate {cert} / key {key}: {exc}") from None
        if self.alpn:
            ctx.set_alpn_protocols([ALPN])
        self._end_points[id(ctx)] = _end_point_of(cert)
        return ctx

    def _on_sni(self, sslobj: ssl.SSLObject | ssl.SSLSocket, server_name: str | None,
                ctx: ssl.SSLContext) -> None:
        chosen = self._default if server_name else ctx  # no SNI: the context picked by address serves
        if server_name:
            name = server_name.lower()
            for suffix, candidate in self._by_name:
                if name == suffix or name.endswith("." + suffix):
                    chosen = candidate
                    break
            if chosen is not ctx:
                sslobj.context = chosen
        sslobj.argon_served = ServedCert(server_name, self._end_points[id(chosen)])  # type: ignore[union-attr]

    def served(self, sslobj: object) -> ServedCert:
        """The SNI and channel-binding data of a finished handshake."""
        found = getattr(sslobj, "argon_served", None)
        if isinstance(found, ServedCert):
            return found
        # no callback ran: the leaf of the context the connection started with was served
        served = getattr(sslobj, "context", None)
        return ServedCert(None, self._end_points.get(id(served), self.end_point))


def _dns_names(cert: Path) -> list[str]:
    leaf = x509.load_pem_x509_certificate(cert.read_bytes())
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        return list(san.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        return [a.value for a in leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME) if isinstance(a.value, str)]


def _end_point_of(cert: Path) -> bytes | None:
    leaf = x509.load_pem_x509_certificate(cert.read_bytes())
    try:
        return tls_server_end_point(leaf.public_bytes(serialization.Encoding.DER))
    except Exception:  # e.g. an Ed25519 signature: no hash to bind with, so only plain SCRAM is offered
        log.warning("certificate %s does not allow channel binding: SCRAM-SHA-256-PLUS is disabled", cert)
        return None


# Certificate generation ----------------------------------------------------------------------------

def ensure_certificates(tls_dir: Path, domain: str) -> TlsFiles:
    """A CA and a leaf for `domain` in `tls_dir`, reusing what is there while it is still valid."""
    tls_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(tls_dir, 0o700)
    ca_key_path = tls_dir / "ca.key"
    files = TlsFiles(tls_dir / "ca.crt", tls_dir / "server.crt", tls_dir / "server.key", ca_key_path)
    now = datetime.datetime.now(datetime.UTC)
    ca = _load_ca(files.ca_cert, ca_key_path, now)
    if ca is None:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Argon"),
                          x509.NameAttribute(NameOID.COMMON_NAME, "Argon local CA")])
        ca_cert = (_builder(name, name, ca_key.public_key(), now, _CA_DAYS)
                   .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                   .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                                content_commitment=False, key_encipherment=False,
                                                data_encipherment=False, key_agreement=False,
                                                encipher_only=False, decipher_only=False), critical=True)
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
                   .sign(ca_key, hashes.SHA256()))
        _write(ca_key_path, _key_pem(ca_key), 0o600)
        _write(files.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
        log.info("generated a local certificate authority in %s", files.ca_cert)
        ca = (ca_cert, ca_key)
        files.cert.unlink(missing_ok=True)
    if not _leaf_ok(files, ca[0], domain, now):
        _issue_leaf(files, ca, domain, now)
        log.info("issued a TLS certificate for *.%s, %s, localhost and 127.0.0.1", domain, domain)
    return files


def _builder(subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey,
             now: datetime.datetime, days: int) -> x509.CertificateBuilder:
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days)))


def _issue_leaf(files: TlsFiles, ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey], domain: str,
                now: datetime.datetime) -> None:
    ca_cert, ca_key = ca
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _leaf(ca_cert, ca_key, key, f"*.{domain}",
                 [x509.DNSName(f"*.{domain}"), x509.DNSName(domain), x509.DNSName("localhost"),
                  x509.IPAddress(ipaddress.ip_address("127.0.0.1"))], now, _LEAF_DAYS)
    _write(files.key, _key_pem(key), 0o600)
    _write(files.cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def _leaf(ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, key: ec.EllipticCurvePrivateKey,
          common_name: str, names: list[x509.GeneralName], now: datetime.datetime, days: int) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    return (_builder(subject, ca_cert.subject, key.public_key(), now, days)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))


def _endpoint_address(address: str | None) -> bool:
    """An endpoint's own loopback address (127.1.X.Y direct, 127.2.X.Y pooled; ADR 0031)."""
    parts = (address or "").split(".")
    return len(parts) == 4 and parts[0] == "127" and parts[1] in ("1", "2") and all(p.isdigit() for p in parts)


def _load_ca(cert_path: Path, key_path: Path,
             now: datetime.datetime) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None:
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError):
        return None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or cert.public_key() != key.public_key():
        return None
    if cert.not_valid_after_utc - _RENEW_BEFORE < now:
        return None
    return cert, key


def _leaf_ok(files: TlsFiles, ca_cert: x509.Certificate, domain: str, now: datetime.datetime) -> bool:
    try:
        cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
        key = serialization.load_pem_private_key(files.key.read_bytes(), password=None)
        cert.verify_directly_issued_by(ca_cert)
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, TypeError, x509.ExtensionNotFound, InvalidSignature):
        return False
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        return False
    if cert.public_key() != key.public_key() or cert.not_valid_after_utc - _RENEW_BEFORE < now:
        return False
    dns = set(names.get_values_for_type(x509.DNSName))
    return {f"*.{domain}", domain, "localhost"} <= dns


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)
    os.replace(tmp, path)
