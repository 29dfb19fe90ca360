"""SCRAM-SHA-256 as Postgres speaks it (RFC 5802/7677): a server for the proxy, and a client that
logs in with a ClientKey instead of a password. Pure: hashlib, hmac, stringprep (ADR 0002).

Why our own: the proxy verifies a client against the role's stored Postgres verifier and, on
success, recovers the client's ClientKey (ClientProof XOR ClientSignature). With it,
`ClientKeyAuth` logs into the compute, whose verifier is byte-identical, without the proxy ever
knowing the password. SCRAM-SHA-256-PLUS binds the exchange to the TLS certificate the proxy
served (`tls-server-end-point`), so a man in the middle with another certificate fails. No library
offers the server-side ClientKey or channel binding; `scramp` serves as the tests' oracle only.

Error texts follow Postgres' auth-scram.c where it has one. A wrong password, and any exchange
against a mock verifier (unknown endpoint or role), fail with the same `WRONG_PASSWORD` text.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import stringprep
import unicodedata
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes

SCRAM = "SCRAM-SHA-256"
SCRAM_PLUS = "SCRAM-SHA-256-PLUS"
CB_TYPE = "tls-server-end-point"
DEFAULT_ITERATIONS = 4096  # Postgres' scram_iterations default
# The most iterations a verifier may ask for. A role's verifier is tenant-controlled (`ALTER ROLE ...
# PASSWORD 'SCRAM-SHA-256$<N>:...'`, Postgres takes N up to 2**31 - 1) and every check of a
# cleartext password, the proxy's or a client's, costs N rounds of HMAC: 4096 take ~2 ms, 100000
# ~40 ms, 10**9 over five minutes. Above this the verifier is unusable (`usable`).
MAX_ITERATIONS = 100_000
KEY_LENGTH = 32  # SHA-256
_SERVER_NONCE_BYTES = 18  # Postgres' SCRAM_RAW_NONCE_LEN
_CLIENT_NONCE_BYTES = 24

WRONG_PASSWORD = "password authentication failed"
MALFORMED = "malformed SCRAM message"
CB_NEGOTIATION = "SCRAM channel binding negotiation error"
CB_CHECK = "SCRAM channel binding check failed"


class ScramError(Exception):
    """A failed exchange; `user_message` is what the client is told."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.user_message = message


# Primitives ---------------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str, what: str = MALFORMED) -> bytes:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise ScramError(what) from None


def _hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.new(key, msg, hashlib.sha256).digest()


def _h(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


# SASLprep (RFC 4013) with Postgres' rule (common/saslprep.c): a password that is valid SASLprep is
# used prepared, anything else raw, so every password works and hashes exactly as in Postgres.

_PROHIBITED = (
    stringprep.in_table_a1, stringprep.in_table_c12, stringprep.in_table_c21_c22, stringprep.in_table_c3,
    stringprep.in_table_c4, stringprep.in_table_c5, stringprep.in_table_c6, stringprep.in_table_c7,
    stringprep.in_table_c8, stringprep.in_table_c9,
)


def _prepared(password: str) -> str | None:
    """RFC 4013 SASLprep of `password` (stored-string rules), or None where it is not valid."""
    mapped = "".join(" " if stringprep.in_table_c12(ch) else ch for ch in password
                     if not stringprep.in_table_b1(ch))
    text = unicodedata.normalize("NFKC", mapped)
    if not text or any(check(ch) for ch in text for check in _PROHIBITED):
        return None
    if any(stringprep.in_table_d1(ch) for ch in text):  # right-to-left text must be all RTL-bounded
        if any(stringprep.in_table_d2(ch) for ch in text):
            return None
        if not (stringprep.in_table_d1(text[0]) and stringprep.in_table_d1(text[-1])):
            return None
    return text


def saslprep(password: str) -> bytes:
    """The bytes Postgres hashes for `password`."""
    if password.isascii():  # Postgres' fast path: ASCII is used as is, control characters included
        return password.encode()
    prepared = _prepared(password)
    return (password if prepared is None else prepared).encode("utf-8", "surrogatepass")


# Verifiers ----------------------------------------------------------------------------------------

_B64 = r"[A-Za-z0-9+/]+={0,2}"
_VERIFIER = re.compile(rf"SCRAM-SHA-256\$([0-9]{{1,10}}):({_B64})\$({_B64}):({_B64})")


@dataclass(frozen=True)
class ScramSecret:
    """A role's verifier: `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>` in pg_authid."""

    iterations: int
    salt: bytes
    stored_key: bytes
    server_key: bytes

    @classmethod
    def parse(cls, text: str) -> ScramSecret:
        """Parse Postgres' format; ValueError for anything else (md5 hashes, plain text...)."""
        match = _VERIFIER.fullmatch(text) if isinstance(text, str) else None
        if match is None:
            raise ValueError("not a SCRAM-SHA-256 verifier")
        try:
            salt, stored, server = (base64.b64decode(part, validate=True) for part in match.group(2, 3, 4))
        except binascii.Error:
            raise ValueError("not a SCRAM-SHA-256 verifier (bad base64)") from None
        iterations = int(match.group(1))
        if iterations < 1 or len(stored) != KEY_LENGTH or len(server) != KEY_LENGTH:
            raise ValueError("not a SCRAM-SHA-256 verifier (bad iterations or key length)")
        return cls(iterations, salt, stored, server)

    @property
    def usable(self) -> bool:
        """False when checking a password against it would cost more than `MAX_ITERATIONS` rounds."""
        return self.iterations <= MAX_ITERATIONS

    def to_string(self) -> str:
        return f"{SCRAM}${self.iterations}:{_b64(self.salt)}${_b64(self.stored_key)}:{_b64(self.server_key)}"

    @classmethod
    def from_password(cls, password: str, *, iterations: int = DEFAULT_ITERATIONS,
                      salt: bytes | None = None) -> ScramSecret:
        """The verifier Postgres would store for `password` (a random 16-byte salt by default)."""
        if iterations < 1:
            raise ValueError("iterations must be positive")
        salt = os.urandom(16) if salt is None else salt
        salted = _salted_password(password, salt, iterations)
        return cls(iterations, salt, _h(_hmac(salted, b"Client Key")), _hmac(salted, b"Server Key"))


def _salted_password(password: str, salt: bytes, iterations: int) -> bytes:
    return hashlib.pbkdf2_hmac("sha256", saslprep(password), salt, iterations)


def mock_secret(server_secret: bytes, endpoint_id: str, user: str) -> ScramSecret:
    """A stable, plausible verifier for an unknown endpoint or role: the same salt on every attempt
    (as Postgres' mock salt), so probing cannot tell it from a real one."""
    seed = _hmac(server_secret, f"{endpoint_id}\0{user}".encode())
    return ScramSecret(DEFAULT_ITERATIONS, seed[:16], _hmac(seed, b"Stored Key"), _hmac(seed, b"Server Key"))


def derive_client_key(secret: ScramSecret, password: str) -> bytes | None:
    """The ClientKey for `password` if it matches `secret`, else None. Slow (PBKDF2): not on the loop."""
    salted = _salted_password(password, secret.salt, secret.iterations)
    client_key = _hmac(salted, b"Client Key")
    stored_ok = hmac.compare_digest(_h(client_key), secret.stored_key)
    server_ok = hmac.compare_digest(_hmac(salted, b"Server Key"), secret.server_key)
    return client_key if stored_ok and server_ok else None


def tls_server_end_point(cert_der: bytes) -> bytes:
    """RFC 5929 channel-binding data: the certificate hashed with its signature's hash algorithm,
    MD5 and SHA-1 upgraded to SHA-256. Ed25519/Ed448 signatures have none: ValueError (libpq
    cannot bind to such a certificate either)."""
    algorithm = x509.load_der_x509_certificate(cert_der).signature_hash_algorithm
    if algorithm is None:
        raise ValueError("the certificate's signature has no hash algorithm (Ed25519?): "
                         "tls-server-end-point is undefined")
    if isinstance(algorithm, hashes.MD5 | hashes.SHA1):
        algorithm = hashes.SHA256()
    digest = hashes.Hash(algorithm)
    digest.update(cert_der)
    return digest.finalize()


# Messages -----------------------------------------------------------------------------------------


def _decode(data: bytes) -> str:
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise ScramError(MALFORMED) from None


def _attributes(text: str) -> list[tuple[str, str]]:
    """`a=1,b=2` -> [("a", "1"), ("b", "2")]: one ASCII letter, `=`, a value without commas."""
    out = []
    for part in text.split(","):
        if len(part) < 2 or part[1] != "=" or not ("a" <= part[0].lower() <= "z"):
            raise ScramError(MALFORMED)
        out.append((part[0], part[2:]))
    return out


def _expect(attrs: list[tuple[str, str]], index: int, name: str) -> str:
    if len(attrs) <= index or attrs[index][0] != name:
        raise ScramError(MALFORMED)
    return attrs[index][1]


def _printable(nonce: str) -> str:
    """RFC 5802 `printable`: %x21-7E except the comma; Postgres checks nonces with the same rule."""
    if not nonce or any(not ("!" <= ch <= "~") for ch in nonce):
        raise ScramError(MALFORMED)
    return nonce


class ScramServer:
    """One server-side exchange: `client_first`, then `client_final`; `client_key` once it passed.

    With `channel_binding` (the tls-server-end-point of the certificate served) SCRAM-SHA-256-PLUS
    is offered too. A `mock` exchange (no real verifier) runs to the end and always fails.
    """

    def __init__(self, secret: ScramSecret, *, channel_binding: bytes | None, mock: bool = False) -> None:
        self.secret = secret
        self.channel_binding = channel_binding
        self.mock = mock
        self.mechanisms = [SCRAM_PLUS, SCRAM] if channel_binding is not None else [SCRAM]
        self.client_key: bytes | None = None
        self._state = "first"
        self._cbind_input = b""  # what `c=` must decode to: the GS2 header (+ binding data for PLUS)
        self._client_first_bare = ""
        self._server_first = ""
        self._nonce = ""

    def _advance(self, expected: str) -> None:
        if self._state != expected:
            raise ScramError("SCRAM exchange out of order")
        self._state = "failed"  # until the step succeeds

    def client_first(self, mechanism: str, data: bytes) -> bytes:
        """Check the client-first message; returns server-first (`r=...,s=...,i=...`)."""
        self._advance("first")
        if mechanism not in self.mechanisms:
            raise ScramError("client selected an invalid SASL authentication mechanism")
        parts = _decode(data).split(",", 2)
        if len(parts) != 3:
            raise ScramError(MALFORMED)
        flag, authzid, bare = parts
        binding = self._check_gs2(mechanism, flag)
        if authzid:
            raise ScramError("client uses authorization identity, but it is not supported")
        attrs = _attributes(bare)
        if attrs[0][0] == "m":
            raise ScramError("client requires an unsupported SCRAM extension")
        _expect(attrs, 0, "n")  # the user name: Postgres ignores it (libpq sends it empty)
        client_nonce = _printable(_expect(attrs, 1, "r"))
        self._cbind_input = f"{flag},,".encode() + binding
        self._client_first_bare = bare
        self._nonce = client_nonce + _b64(os.urandom(_SERVER_NONCE_BYTES))
        self._server_first = f"r={self._nonce},s={_b64(self.secret.salt)},i={self.secret.iterations}"
        self._state = "final"
        return self._server_first.encode()

    def _check_gs2(self, mechanism: str, flag: str) -> bytes:
        """The GS2 channel-binding flag against the mechanism chosen; the binding data to expect."""
        if flag.startswith("p="):
            if mechanism != SCRAM_PLUS or self.channel_binding is None:
                raise ScramError(MALFORMED)  # binding data sent with plain SCRAM-SHA-256
            if flag[2:] != CB_TYPE:
                raise ScramError(f'unsupported SCRAM channel-binding type "{flag[2:]}"')
            return self.channel_binding
        if mechanism == SCRAM_PLUS:
            raise ScramError(MALFORMED)  # SCRAM-SHA-256-PLUS chosen, but no binding data
        if flag == "y" and self.channel_binding is not None:
            raise ScramError(CB_NEGOTIATION)  # the client thinks we cannot bind: a downgrade
        if flag not in ("y", "n"):
            raise ScramError(MALFORMED)
        return b""

    def client_final(self, data: bytes) -> bytes:
        """Check the proof; returns server-final (`v=...`) and sets `client_key`."""
        self._advance("final")
        text = _decode(data)
        head, sep, proof_text = text.rpartition(",")
        attrs = _attributes(text)
        if not sep or attrs[-1][0] != "p":
            raise ScramError(MALFORMED)
        if _unb64(_expect(attrs, 0, "c")) != self._cbind_input:
            raise ScramError(CB_CHECK)
        if _expect(attrs, 1, "r") != self._nonce:
            raise ScramError("invalid SCRAM response (nonce does not match)")
        proof = _unb64(proof_text[2:])
        if len(proof) != KEY_LENGTH:
            raise ScramError(MALFORMED)
        auth_message = f"{self._client_first_bare},{self._server_first},{head}".encode()
        client_key = _xor(proof, _hmac(self.secret.stored_key, auth_message))
        if not hmac.compare_digest(_h(client_key), self.secret.stored_key) or self.mock:
            raise ScramError(WRONG_PASSWORD)
        self.client_key = client_key
        self._state = "done"
        return f"v={_b64(_hmac(self.secret.server_key, auth_message))}".encode()


class ClientKeyAuth:
    """The client side of the proxy's login into a compute: SCRAM-SHA-256 driven by a ClientKey.

    The compute's salt and iteration count are ignored: ClientKey and ServerKey already encode them.
    """

    mechanism = SCRAM

    def __init__(self, client_key: bytes, server_key: bytes) -> None:
        self.client_key = client_key
        self.server_key = server_key
        self._nonce = _b64(os.urandom(_CLIENT_NONCE_BYTES))
        self._client_first_bare = f"n=,r={self._nonce}"
        self._auth_message = b""

    def client_first(self) -> bytes:
        return f"n,,{self._client_first_bare}".encode()

    def client_final(self, server_first: bytes) -> bytes:
        text = _decode(server_first)
        attrs = _attributes(text)
        nonce = _printable(_expect(attrs, 0, "r"))
        _expect(attrs, 1, "s")
        _expect(attrs, 2, "i")
        if not nonce.startswith(self._nonce) or nonce == self._nonce:
            raise ScramError("invalid SCRAM server-first message (nonce does not match)")
        head = f"c={_b64(b'n,,')},r={nonce}"
        self._auth_message = f"{self._client_first_bare},{text},{head}".encode()
        proof = _xor(self.client_key, _hmac(_h(self.client_key), self._auth_message))
        return f"{head},p={_b64(proof)}".encode()

    def verify_server_final(self, data: bytes) -> None:
        """Raise ScramError unless the server proved it knows ServerKey (or if it reported an error)."""
        text = _decode(data)
        if text.startswith("e="):
            raise ScramError(f"SCRAM error from the server: {text[2:]}")
        if not self._auth_message:
            raise ScramError("SCRAM exchange out of order")
        signature = _unb64(_expect(_attributes(text), 0, "v"), "server signature mismatch")
        if not hmac.compare_digest(signature, _hmac(self.server_key, self._auth_message)):
            raise ScramError("server signature mismatch")
