"""Identifiers in Neon's shapes, and validation of names that users choose.

neonctl treats a string as a branch id only if it matches ^br-[a-z0-9]+-[a-z0-9]+-[a-z0-9]+$,
so every generated id has exactly three dash-separated parts after its prefix.
"""

from __future__ import annotations

import re
import secrets
import string
import uuid

from argon.errors import UserError

_ADJECTIVES = ["amber", "autumn", "billowing", "bitter", "black", "blue", "bold", "broad", "calm", "cold", "cool", "crimson", "damp", "dark", "dawn", "delicate", "divine", "dry", "empty", "falling", "fancy", "flat", "floral", "fragrant", "frosty", "gentle", "green", "hidden", "holy", "icy", "jolly", "late", "lingering", "little", "lively", "long", "lucky", "misty", "morning", "muddy", "nameless", "noisy", "odd", "old", "orange", "patient", "plain", "polished", "proud", "purple", "quiet", "rapid", "raspy", "red", "restless", "rough", "round", "royal", "shiny", "shrill", "shy", "silent", "small", "snowy", "soft", "solitary", "sparkling", "spring", "square", "steep", "still", "summer", "super", "sweet", "throbbing", "tight", "tiny", "twilight", "wandering", "weathered", "white", "wild", "winter", "wispy", "withered", "yellow", "young"]
_NOUNS = ["art", "band", "bar", "base", "bird", "block", "boat", "bonus", "bread", "breeze", "brook", "bush", "butterfly", "cake", "cell", "cherry", "cloud", "credit", "darkness", "dawn", "dew", "disk", "dream", "dust", "feather", "field", "fire", "firefly", "flower", "fog", "forest", "frog", "frost", "glade", "glitter", "grass", "hall", "hat", "haze", "heart", "hill", "king", "lab", "lake", "leaf", "limit", "math", "meadow", "mode", "moon", "morning", "mountain", "mouse", "mud", "night", "paper", "pine", "poetry", "pond", "queen", "rain", "recipe", "resonance", "rice", "river", "salad", "scene", "sea", "shadow", "shape", "silence", "sky", "smoke", "snow", "snowflake", "sound", "star", "sun", "sunset", "surf", "term", "thunder", "tooth", "tree", "truth", "union", "unit", "violet", "voice", "water", "waterfall", "wave", "wildflower", "wind", "wood"]
_ALNUM = string.ascii_lowercase + string.digits

ID_RE = re.compile(r"^[a-z0-9-]{1,60}$")
BRANCH_ID_RE = re.compile(r"^br-[a-z0-9]+-[a-z0-9]+-[a-z0-9]+$")
ENDPOINT_ID_RE = re.compile(r"^ep-[a-z0-9]+-[a-z0-9]+-[a-z0-9]+$")


def _words() -> str:
    return f"{secrets.choice(_ADJECTIVES)}-{secrets.choice(_NOUNS)}"


def _suffix(n: int = 8) -> str:
    return "".join(secrets.choice(_ALNUM) for _ in range(n))


def project_id() -> str:
    return f"{_words()}-{''.join(secrets.choice(string.digits) for _ in range(8))}"


def branch_id() -> str:
    return f"br-{_words()}-{_suffix()}"


def snapshot_id() -> str:
    return f"snap-{_words()}-{_suffix()}"


def endpoint_id() -> str:
    return f"ep-{_words()}-{_suffix()}"


def operation_id() -> str:
    return str(uuid.uuid4())


def password(n: int = 16) -> str:
    """Neon-style generated password: letters and digits only, safe in URIs and shells."""
    alphabet = string.ascii_letters + string.digits
    return "npg_" + "".join(secrets.choice(alphabet) for _ in range(n))


def check_id(value: str, what: str) -> str:
    if not ID_RE.match(value):
        raise UserError(f"invalid {what} id {value!r}: ids are 1-60 lowercase letters, digits and '-'")
    return value


_NAME_MAX = 63  # Postgres identifiers are at most 63 bytes


def check_pg_name(value: object, what: str) -> str:
    """Role and database names: any characters Postgres accepts (they are always quoted), 1-63 bytes."""
    if not isinstance(value, str) or not value:
        raise UserError(f"{what} name must be a non-empty string")
    if len(value.encode()) > _NAME_MAX:
        raise UserError(f"{what} name {value!r} is too long: at most {_NAME_MAX} bytes")
    if "\x00" in value or any(ord(c) < 32 for c in value):
        raise UserError(f"{what} name must not contain control characters")
    return value


def check_display_name(value: object, what: str, max_len: int = 256) -> str:
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{what} name must be a non-empty string")
    if len(value) > max_len:
        raise UserError(f"{what} name is too long: at most {max_len} characters")
    if any(ord(c) < 32 for c in value):
        raise UserError(f"{what} name must not contain control characters")
    return value
