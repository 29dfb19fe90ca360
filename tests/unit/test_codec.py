"""Protocol framing: startup packets, encoders/parsers round trips, `options` handling, fuzzing."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from argon.wire import codec
from argon.wire.codec import (
    CancelRequest,
    GSSENCRequest,
    ProtocolViolation,
    SSLRequest,
    StartupMessage,
)


def body(code: int, rest: bytes = b"") -> bytes:
    return struct.pack("!I", code) + rest


def pairs(*items: bytes) -> bytes:
    return b"".join(item + b"\0" for item in items) + b"\0"


def split_frame(data: bytes) -> tuple[str, bytes]:
    """A framed message -> (type, payload), checking the length word."""
    msg_type, length = codec.message_header(data[:5], max_length=1 << 20)
    assert len(data) == 5 + length
    return msg_type, data[5:]


def read_startup(packet: bytes) -> object:
    length = codec.startup_packet_length(packet[:4])
    assert len(packet) == length
    return codec.parse_startup_packet(packet[4:])


# Startup packets ----------------------------------------------------------------------------------


def test_ssl_and_gssenc_requests() -> None:
    assert read_startup(codec.ssl_request()) == SSLRequest()
    assert codec.parse_startup_packet(body(codec.GSSENC_REQUEST_CODE)) == GSSENCRequest()
    with pytest.raises(ProtocolViolation):
        codec.parse_startup_packet(body(codec.SSL_REQUEST_CODE, b"\0\0\0\0"))


@pytest.mark.parametrize("key", [b"\x01\x02\x03\x04", bytes(range(32)), b"\xff" * 256])
def test_cancel_request_keys_of_4_to_256_bytes(key: bytes) -> None:
    packet = codec.parse_startup_packet(body(codec.CANCEL_REQUEST_CODE, struct.pack("!I", 4242) + key))
    assert packet == CancelRequest(4242, int.from_bytes(key, "big"))


@pytest.mark.parametrize("key_length", [0, 3, 257])
def test_cancel_request_with_a_bad_key_length(key_length: int) -> None:
    with pytest.raises(ProtocolViolation, match="invalid length of cancel request packet"):
        codec.parse_startup_packet(body(codec.CANCEL_REQUEST_CODE, b"\0\0\0\1" + b"k" * key_length))


def test_cancel_request_encoder_round_trip() -> None:
    packet = codec.cancel_request(12345, 0xDEADBEEF)
    assert len(packet) == 16
    assert read_startup(packet) == CancelRequest(12345, 0xDEADBEEF)


def test_startup_message_3_0() -> None:
    packet = codec.startup_message({"user": "alice", "database": "app", "options": "endpoint=ep-1"})
    assert read_startup(packet) == StartupMessage(
        3, 0, {"user": "alice", "database": "app", "options": "endpoint=ep-1"}, ())


def test_startup_message_3_2_sets_protocol_options_apart() -> None:
    raw = body(3 << 16 | 2, pairs(b"user", b"bob", b"_pq_.test_option", b"1", b"_pq_.other", b""))
    packet = codec.parse_startup_packet(raw)
    assert packet == StartupMessage(3, 2, {"user": "bob"}, ("_pq_.test_option", "_pq_.other"))


def test_startup_message_with_unicode_and_empty_values() -> None:
    raw = body(3 << 16, pairs(b"user", "jos\u00e9".encode(), b"application_name", b""))
    assert codec.parse_startup_packet(raw) == StartupMessage(3, 0, {"user": "jos\u00e9", "application_name": ""})


def test_startup_message_without_parameters() -> None:
    assert codec.parse_startup_packet(body(3 << 16, b"\0")) == StartupMessage(3, 0, {}, ())


@pytest.mark.parametrize(("major", "minor"), [(2, 0), (4, 0), (1, 7)])
def test_other_protocol_versions_are_refused_with_postgres_text(major: int, minor: int) -> None:
    with pytest.raises(ProtocolViolation) as info:
        codec.parse_startup_packet(body(major << 16 | minor, pairs(b"user", b"x")))
    assert info.value.user_message == f"unsupported frontend protocol {major}.{minor}: server supports 3.0 to 3.0"


@pytest.mark.parametrize("params", [
    b"",  # no terminator at all
    b"user\0alice\0",  # the list's terminator missing
    b"user\0alice",  # the value's too
    b"user\0\0",  # a name without value
    b"user\0alice\0\0\0",  # garbage after the terminator
    b"user\0alice\0\0database\0x\0\0",  # pairs after the end
    b"\0user\0alice\0\0",  # an empty name ends the list early
])
def test_malformed_startup_layouts(params: bytes) -> None:
    with pytest.raises(ProtocolViolation, match="invalid startup packet layout"):
        codec.parse_startup_packet(body(3 << 16, params))


def test_duplicate_startup_parameters_are_refused() -> None:
    with pytest.raises(ProtocolViolation, match='duplicate startup parameter "user"'):
        codec.parse_startup_packet(body(3 << 16, pairs(b"user", b"a", b"user", b"b")))


def test_non_utf8_startup_parameters_are_refused() -> None:
    with pytest.raises(ProtocolViolation, match="invalid byte sequence"):
        codec.parse_startup_packet(body(3 << 16, pairs(b"user", b"\xff\xfe")))


@pytest.mark.parametrize("length", [-1, 0, 7, 10001, 2**31 - 1])
def test_startup_packet_length_limits(length: int) -> None:
    with pytest.raises(ProtocolViolation, match="invalid length of startup packet"):
        codec.startup_packet_length(struct.pack("!i", length))


def test_startup_packet_length_accepts_the_range() -> None:
    assert codec.startup_packet_length(struct.pack("!i", 8)) == 8
    assert codec.startup_packet_length(struct.pack("!i", 10000)) == 10000
    with pytest.raises(ProtocolViolation):
        codec.startup_packet_length(b"\0\0\0")


def test_short_startup_body() -> None:
    with pytest.raises(ProtocolViolation):
        codec.parse_startup_packet(b"\0\0")


# Message headers ----------------------------------------------------------------------------------


def test_message_header() -> None:
    assert codec.message_header(b"p" + struct.pack("!i", 4), max_length=10) == ("p", 0)
    assert codec.message_header(b"Q" + struct.pack("!i", 14), max_length=10) == ("Q", 10)


@pytest.mark.parametrize("length", [-5, 0, 3, 15, 2**31 - 1])
def test_message_header_limits(length: int) -> None:
    with pytest.raises(ProtocolViolation, match="invalid message length"):
        codec.message_header(b"p" + struct.pack("!i", length), max_length=10)


# Encoders and parsers -----------------------------------------------------------------------------


def test_error_response_fields() -> None:
    msg_type, payload = split_frame(codec.error_response("no such endpoint"))
    assert msg_type == "E"
    assert payload == b"SERROR\0VERROR\0CXX000\0Mno such endpoint\0\0"
    assert codec.parse_error_fields(payload) == {"S": "ERROR", "V": "ERROR", "C": "XX000", "M": "no such endpoint"}
    _, payload = split_frame(codec.error_response("bye", code="57P01", severity="FATAL"))
    assert codec.parse_error_fields(payload) == {"S": "FATAL", "V": "FATAL", "C": "57P01", "M": "bye"}


def test_error_response_survives_a_nul_in_the_text() -> None:
    _, payload = split_frame(codec.error_response("a\0b"))
    assert codec.parse_error_fields(payload)["M"] == "ab"


def test_parse_error_fields_is_lenient_about_encoding_but_not_framing() -> None:
    assert codec.parse_error_fields(b"Mcaf\xe9\0\0") == {"M": "caf\ufffd"}
    assert codec.parse_error_fields(b"") == {}
    with pytest.raises(ProtocolViolation):
        codec.parse_error_fields(b"Mno terminator")


def test_negotiate_protocol_version_sends_the_full_version() -> None:
    msg_type, payload = split_frame(codec.negotiate_protocol_version(0, ["_pq_.a", "_pq_.b"]))
    assert msg_type == "v"
    assert payload == struct.pack("!II", 0x00030000, 2) + b"_pq_.a\0_pq_.b\0"
    assert split_frame(codec.negotiate_protocol_version(0, []))[1] == struct.pack("!II", 0x00030000, 0)


@pytest.mark.parametrize(("message", "code", "rest"), [
    (codec.auth_ok(), 0, b""),
    (codec.auth_cleartext_password(), 3, b""),
    (codec.auth_sasl(["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]), 10, b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0"),
    (codec.auth_sasl_continue(b"r=abc,s=xyz,i=4096"), 11, b"r=abc,s=xyz,i=4096"),
    (codec.auth_sasl_final(b"v=sig"), 12, b"v=sig"),
])
def test_authentication_round_trips(message: bytes, code: int, rest: bytes) -> None:
    msg_type, payload = split_frame(message)
    assert msg_type == "R"
    assert codec.parse_authentication(payload) == (code, rest)


def test_parse_authentication_too_short() -> None:
    with pytest.raises(ProtocolViolation):
        codec.parse_authentication(b"\0\0")


@pytest.mark.parametrize(("pid", "secret"), [(1, 2), (2**31 - 1, 2**32 - 1), (7, 0)])
def test_backend_key_data_round_trip(pid: int, secret: int) -> None:
    msg_type, payload = split_frame(codec.backend_key_data(pid, secret))
    assert msg_type == "K" and len(payload) == 8
    assert codec.parse_backend_key_data(payload) == (pid, secret)


def test_backend_key_data_of_protocol_3_2() -> None:
    assert codec.parse_backend_key_data(struct.pack("!I", 9) + b"\1" * 32) == (9, int.from_bytes(b"\1" * 32, "big"))
    for bad in (b"", b"\0" * 7, b"\0" * 261):
        with pytest.raises(ProtocolViolation):
            codec.parse_backend_key_data(bad)


@pytest.mark.parametrize("data", [b"n,,n=,r=abc", b"", bytes(range(256))])
def test_sasl_initial_response_round_trip(data: bytes) -> None:
    msg_type, payload = split_frame(codec.sasl_initial_response("SCRAM-SHA-256", data))
    assert msg_type == "p"
    assert codec.parse_sasl_initial_response(payload) == ("SCRAM-SHA-256", data)


def test_sasl_initial_response_without_data() -> None:
    assert codec.parse_sasl_initial_response(b"SCRAM-SHA-256\0" + struct.pack("!i", -1)) == ("SCRAM-SHA-256", b"")


@pytest.mark.parametrize("payload", [
    b"SCRAM-SHA-256",  # no NUL after the mechanism
    b"SCRAM-SHA-256\0\0\0",  # no room for the length
    b"SCRAM-SHA-256\0" + struct.pack("!i", 5) + b"abc",  # shorter than announced
    b"SCRAM-SHA-256\0" + struct.pack("!i", 1) + b"abc",  # longer
    b"SCRAM-SHA-256\0" + struct.pack("!i", -1) + b"abc",  # "no data" followed by data
    b"SCRAM-SHA-256\0" + struct.pack("!i", -2),
    b"\xff\0" + struct.pack("!i", 0),
])
def test_malformed_sasl_initial_responses(payload: bytes) -> None:
    with pytest.raises(ProtocolViolation):
        codec.parse_sasl_initial_response(payload)


def test_sasl_response_round_trip() -> None:
    msg_type, payload = split_frame(codec.sasl_response(b"c=biws,r=x,p=y"))
    assert msg_type == "p"
    assert codec.parse_sasl_response(payload) == b"c=biws,r=x,p=y"


@pytest.mark.parametrize("password", ["", "secret", "endpoint=ep-1;p\u00e4ss$word"])
def test_password_message_round_trip(password: str) -> None:
    msg_type, payload = split_frame(codec.password_message(password))
    assert msg_type == "p"
    assert codec.parse_password_message(payload) == password


@pytest.mark.parametrize("payload", [b"", b"no terminator", b"two\0nuls\0", b"\xff\xfe\0"])
def test_malformed_password_messages(payload: bytes) -> None:
    with pytest.raises(ProtocolViolation):
        codec.parse_password_message(payload)


def test_encoders_refuse_nul_in_strings() -> None:
    with pytest.raises(ValueError):
        codec.startup_message({"user": "a\0b"})


def test_terminate() -> None:
    assert codec.terminate() == b"X\0\0\0\4"


# options, routing words, forwarded parameters -----------------------------------------------------


@pytest.mark.parametrize(("options", "words"), [
    ("", []),
    ("   ", []),
    ("endpoint=ep-1", ["endpoint=ep-1"]),
    ("-c search_path=x  endpoint=ep-1\t", ["-c", "search_path=x", "endpoint=ep-1"]),
    (r"-c search_path=a\ b", ["-c", "search_path=a b"]),
    (r"a\\b c", [r"a\b", "c"]),
    ("a\\", ["a"]),  # a trailing backslash escapes nothing
    ("\\", []),
    ("x\u00a0y", ["x\u00a0y"]),  # only ASCII whitespace separates, as C isspace()
    ("a\nb\rc\vd\fe", ["a", "b", "c", "d", "e"]),
])
def test_split_options(options: str, words: list[str]) -> None:
    assert codec.split_options(options) == words


def test_join_options_escapes() -> None:
    assert codec.join_options(["-c", "search_path=a b", "x\\y"]) == r"-c search_path=a\ b x\\y"


@given(st.text(alphabet=st.sampled_from(list(" \t\n\\ab=-\u00e9")) | st.characters(), max_size=40))
def test_join_inverts_split(options: str) -> None:
    words = codec.split_options(options)
    assert codec.split_options(codec.join_options(words)) == words


@given(st.lists(st.text(min_size=1, max_size=10), max_size=6))
def test_split_inverts_join(words: list[str]) -> None:
    assert codec.split_options(codec.join_options(words)) == words


@pytest.mark.parametrize(("options", "endpoint"), [
    ("endpoint=ep-a-b-123", "ep-a-b-123"),
    ("-c search_path=x endpoint=ep-1", "ep-1"),
    ("project=ep-old", "ep-old"),
    ("project=ep-old endpoint=ep-new", "ep-new"),  # endpoint= wins
    ("endpoint=ep-first endpoint=ep-second", "ep-first"),
    (r"-c application_name=a\ endpoint=ep-1", None),  # escaped: part of another word
    (r"endpoint=ep\ 1", "ep 1"),  # routing validates the characters, not this
    ("--endpoint=ep-1", None),
    ("xendpoint=ep-1", None),
    ("endpoint=", ""),
    ("", None),
    ("-c search_path=x", None),
])
def test_endpoint_from_options(options: str, endpoint: str | None) -> None:
    assert codec.endpoint_from_options(options) == endpoint


def test_filter_drops_routing_words_and_protocol_options() -> None:
    params = {"user": "a", "database": "d", "options": "endpoint=ep-1 -c search_path=x\\ y neon_lsn:0/2",
              "_pq_.x": "1", "application_name": "app"}
    expected = {"user": "a", "database": "d", "options": "-c search_path=x\\ y", "application_name": "app"}
    assert codec.filter_startup_params(params, forward_all=False) == expected
    assert codec.filter_startup_params(params, forward_all=True) == expected


def test_filter_drops_options_left_empty_and_keeps_untouched_options_verbatim() -> None:
    assert codec.filter_startup_params({"user": "a", "options": " project=ep-1 "}, forward_all=False) == {"user": "a"}
    options = "-c  search_path=x"
    assert codec.filter_startup_params({"options": options}, forward_all=False) == {"options": options}


def test_filter_keeps_gucs_and_drops_client_side_keywords() -> None:
    params = {"user": "a", "client_encoding": "UTF8", "DateStyle": "ISO", "TimeZone": "UTC", "work_mem": "64MB",
              "myapp.tenant": "t1", "extra_float_digits": "3", "channel_binding": "require", "sslmode": "require",
              "SSLMode": "require", "bad-name": "x", "with space": "y", "": "z"}
    assert codec.filter_startup_params(params, forward_all=False) == {
        "user": "a", "client_encoding": "UTF8", "DateStyle": "ISO", "TimeZone": "UTC", "work_mem": "64MB",
        "myapp.tenant": "t1", "extra_float_digits": "3"}
    forwarded = codec.filter_startup_params(params, forward_all=True)
    assert forwarded == params


def test_filter_refuses_physical_replication_unless_forwarding_everything() -> None:
    for physical in ("true", "on", "1", "yes"):
        with pytest.raises(ProtocolViolation, match="physical replication connections are not supported"):
            codec.filter_startup_params({"user": "a", "replication": physical}, forward_all=False)
    logical = {"user": "a", "replication": "database"}  # a subscriber's walsender connection
    assert codec.filter_startup_params(logical, forward_all=False) == logical
    assert codec.filter_startup_params({"replication": "true"}, forward_all=True) == {"replication": "true"}
    assert codec.filter_startup_params({"replication": "off"}, forward_all=False) == {"replication": "off"}


# Fuzzing: arbitrary bytes only ever raise ProtocolViolation ---------------------------------------

_PARSERS = [codec.parse_startup_packet, codec.parse_sasl_initial_response, codec.parse_sasl_response,
            codec.parse_password_message, codec.parse_authentication, codec.parse_error_fields,
            codec.parse_backend_key_data]


def _only_protocol_violations(parser: object, data: bytes) -> None:
    try:
        parser(data)  # type: ignore[operator]
    except ProtocolViolation as exc:
        assert exc.user_message


@given(st.binary(max_size=300))
def test_parsers_on_arbitrary_bytes(data: bytes) -> None:
    for parser in _PARSERS:
        _only_protocol_violations(parser, data)


_startup_like = st.builds(
    lambda code, items, tail: struct.pack("!I", code) + b"".join(items) + tail,
    st.sampled_from([3 << 16, 3 << 16 | 2, codec.CANCEL_REQUEST_CODE, codec.SSL_REQUEST_CODE, 2 << 16]),
    st.lists(st.sampled_from([b"user\0", b"_pq_.x\0", b"\0", b"\xff", b"v\0", b"options\0"]), max_size=8),
    st.binary(max_size=4),
)


@given(_startup_like)
def test_startup_parser_on_near_valid_packets(data: bytes) -> None:
    _only_protocol_violations(codec.parse_startup_packet, data)


@given(st.binary(min_size=4, max_size=4), st.binary(min_size=5, max_size=5))
def test_headers_on_arbitrary_bytes(header4: bytes, header5: bytes) -> None:
    _only_protocol_violations(codec.startup_packet_length, header4)
    _only_protocol_violations(lambda data: codec.message_header(data, max_length=8192), header5)


_param_text = st.characters(exclude_characters="\0", exclude_categories=["Cs"])  # what UTF-8 decoding yields


@given(st.dictionaries(st.text(_param_text, min_size=1, max_size=8), st.text(_param_text, max_size=8), max_size=5))
def test_startup_message_round_trip_property(params: dict[str, str]) -> None:
    params = {k: v for k, v in params.items() if not k.startswith("_pq_.")}
    packet = codec.startup_message(params)
    if len(packet) <= codec.MAX_STARTUP_PACKET:
        assert read_startup(packet) == StartupMessage(3, 0, params, ())
