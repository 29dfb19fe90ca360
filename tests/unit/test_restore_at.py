"""`argon restore --at`: an RFC 3339 time or an LSN; anything else is a clear error."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from argon.control.restore import parse_at
from argon.errors import UserError


def test_at_takes_a_time_or_an_lsn() -> None:
    assert parse_at("2026-11-24T13:00:00Z") == datetime(2026, 11, 24, 13, tzinfo=UTC)
    assert parse_at(" 0/16b3748 ") == "0/16B3748"
    assert parse_at(None) is None
    with pytest.raises(UserError, match="neither a time nor an LSN"):
        parse_at("yesterday")
    with pytest.raises(UserError, match="time zone"):
        parse_at("2026-11-24T13:00:00")
