"""Whether SQL text can leave session state behind on a pooled server connection (ADR 0017).

The transaction pooler runs `DISCARD ALL` on a server connection after a transaction whose
statements may have created state that outlives the transaction: a session `SET` or
`set_config(..., false)` of an untracked parameter, `LISTEN`, `PREPARE`, a `DEALLOCATE` of one
name, a `WITH HOLD` cursor, a temporary table (unless `ON COMMIT DROP`), `SELECT ... INTO TEMP`,
`LOAD`, a session advisory lock, a `dblink_connect`. Statements that only remove state (`RESET`,
`DISCARD`, `UNLISTEN`, `DEALLOCATE ALL`) and the parameters the pooler tracks itself
(`client_encoding`, `DateStyle`, `TimeZone`, `standard_conforming_strings`, `application_name`)
need no reset.

A small lexer, not a parser: it skips comments, string literals (standard, `E''`, `U&''`), quoted
identifiers and dollar quotes, splits statements at top-level `;`, and looks at keywords. Text it
cannot follow (an unterminated quote or comment) counts as state-changing. What runs inside a
function or a `DO` body is not seen (known limit, documented). The C engine (`_pooler.c`) ports
this function; both are tested against the same cases.
"""

from __future__ import annotations

import re

TRACKED_NAMES = frozenset({"client_encoding", "datestyle", "timezone", "standard_conforming_strings",
                           "application_name"})
_SESSION_FUNCTIONS = frozenset({b"pg_advisory_lock", b"pg_advisory_lock_shared", b"pg_try_advisory_lock",
                                b"pg_try_advisory_lock_shared", b"dblink_connect", b"dblink_connect_u"})
_IDENT_START = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_") | frozenset(range(0x80, 0x100))
_IDENT_CHARS = _IDENT_START | frozenset(b"0123456789$")
_SPACE = frozenset(b" \t\n\r\f\v")
MAX_TOKENS_PER_STATEMENT = 4096  # beyond this a statement is judged on what was seen (and marked)

# Token kinds: an identifier or keyword (lower-cased text), a string literal (its text), or punctuation.
IDENT, STRING, PUNCT = 0, 1, 2


class Unterminated(Exception):
    """A quote or comment runs to the end of the text."""


def _tokens(sql: bytes) -> list[list[tuple[int, bytes]]]:
    """Statements as token lists (comments and whitespace dropped)."""
    statements: list[list[tuple[int, bytes]]] = []
    current: list[tuple[int, bytes]] = []
    i, n = 0, len(sql)
    while i < n:
        ch = sql[i]
        if ch in _SPACE:
            i += 1
        elif ch == 0x2D and sql[i + 1:i + 2] == b"-":  # -- comment
            end = sql.find(b"\n", i)
            i = n if end < 0 else end + 1
        elif ch == 0x2F and sql[i + 1:i + 2] == b"*":  # /* nested */ comment
            depth, i = 1, i + 2
            while depth:
                if i >= n:
                    raise Unterminated
                if sql[i:i + 2] == b"/*":
                    depth, i = depth + 1, i + 2
                elif sql[i:i + 2] == b"*/":
                    depth, i = depth - 1, i + 2
                else:
                    i += 1
        elif ch == 0x27:  # 'standard string' ('' inside)
            text, i = _quoted(sql, i + 1, 0x27, backslash=False)
            current.append((STRING, text))
        elif ch in (0x45, 0x65) and sql[i + 1:i + 2] == b"'":  # E'escape string'
            text, i = _quoted(sql, i + 2, 0x27, backslash=True)
            current.append((STRING, text))
        elif ch in (0x55, 0x75) and sql[i + 1:i + 3] == b"&'":  # U&'unicode string'
            text, i = _quoted(sql, i + 3, 0x27, backslash=False)
            current.append((STRING, text))
        elif ch == 0x22:  # "quoted identifier": compared as written
            text, i = _quoted(sql, i + 1, 0x22, backslash=False)
            current.append((IDENT, text))
        elif ch == 0x24 and i + 1 < n and sql[i + 1] not in b"0123456789":  # $tag$ ... $tag$ (not $1)
            end = sql.find(b"$", i + 1)
            tag = sql[i:end + 1] if end > 0 else b""
            if not tag or not all(c in _IDENT_CHARS and c != 0x24 for c in tag[1:-1]):
                i += 1
                continue
            close = sql.find(tag, end + 1)
            if close < 0:
                raise Unterminated
            current.append((STRING, b""))
            i = close + len(tag)
        elif ch in _IDENT_START:
            j = i + 1
            while j < n and sql[j] in _IDENT_CHARS:
                j += 1
            current.append((IDENT, sql[i:j].lower()))
            i = j
        elif ch == 0x3B:  # ;
            if current:
                statements.append(current)
            current = []
            i += 1
        else:
            current.append((PUNCT, sql[i:i + 1]))
            i += 1
        if len(current) > MAX_TOKENS_PER_STATEMENT:
            current.insert(0, (IDENT, b"load"))  # too long to judge: treated as state-changing
            statements.append(current)
            current = []
            while i < n and sql[i] != 0x3B:  # the rest of the statement is not lexed
                i += 1
    if current:
        statements.append(current)
    return statements


def _quoted(sql: bytes, i: int, quote: int, *, backslash: bool) -> tuple[bytes, int]:
    """The text of a quoted token starting after its opening quote, and the index after it."""
    out = bytearray()
    n = len(sql)
    while i < n:
        ch = sql[i]
        if backslash and ch == 0x5C:
            if i + 1 < n:
                out.append(sql[i + 1])
            i += 2
        elif ch == quote:
            if i + 1 < n and sql[i + 1] == quote:
                out.append(quote)
                i += 2
            else:
                return bytes(out), i + 1
        else:
            out.append(ch)
            i += 1
    raise Unterminated


def _word(tokens: list[tuple[int, bytes]], k: int) -> bytes:
    return tokens[k][1] if k < len(tokens) and tokens[k][0] == IDENT else b""


def _statement_changes_session(tokens: list[tuple[int, bytes]]) -> bool:
    k = 0
    while k < len(tokens) and tokens[k] == (PUNCT, b"("):  # (SELECT ...)
        k += 1
    first = _word(tokens, k)
    if first == b"set":
        second = _word(tokens, k + 1)
        if second in (b"local", b"transaction", b"constraints"):
            return False
        name = _word(tokens, k + 2) if second == b"session" else second
        if name == b"time" and _word(tokens, k + (3 if second == b"session" else 2)) == b"zone":
            name = b"timezone"
        return name.decode("utf-8", "replace") not in TRACKED_NAMES
    if first in (b"listen", b"prepare", b"load"):
        return True
    if first == b"deallocate":
        rest = [w for _, w in tokens[k + 1:]]
        return rest not in ([b"all"], [b"prepare", b"all"])
    words = [w for kind, w in tokens if kind == IDENT]
    if first == b"declare" and _follows(words, b"with", b"hold"):
        return True
    if first == b"create":
        head = []
        for word in words[1:8]:  # CREATE [OR REPLACE] [GLOBAL | LOCAL] TEMP[ORARY] [UNLOGGED] TABLE ...
            if word in (b"table", b"view", b"sequence", b"recursive"):
                break
            head.append(word)
        if (b"temp" in head or b"temporary" in head) and not _follows(words, b"commit", b"drop"):
            return True
    if _follows(words, b"into", b"temp") or _follows(words, b"into", b"temporary"):
        return True
    return _calls_session_function(tokens)


def _follows(words: list[bytes], a: bytes, b: bytes) -> bool:
    return any(words[i] == a and words[i + 1] == b for i in range(len(words) - 1))


def _calls_session_function(tokens: list[tuple[int, bytes]]) -> bool:
    for k, (kind, text) in enumerate(tokens):
        if kind != IDENT or k + 1 >= len(tokens) or tokens[k + 1] != (PUNCT, b"("):
            continue
        if text in _SESSION_FUNCTIONS:
            return True
        if text == b"set_config":
            arg = tokens[k + 2] if k + 2 < len(tokens) else (PUNCT, b"")
            if arg[0] != STRING or arg[1].lower().decode("utf-8", "replace") not in TRACKED_NAMES:
                return True
    return False


# Every rule needs one of these words: text without any of them is decided without lexing.
_TRIGGERS = (b"listen", b"prepare", b"deallocate", b"hold", b"temp", b"load", b"advisory", b"dblink", b"set_config")
_LEADING_SET = re.compile(rb"(?:^|;)[\s(]*set\b")


def _needs_lexing(sql: bytes) -> bool:
    """Whether a rule could apply. `set` matters where a statement starts (`UPDATE ... SET` is the
    common case and needs nothing) or in `set_config`; text with comments is always lexed (a
    comment can hide where a statement starts). An unterminated quote in text that needs no
    lexing is a syntax error: nothing runs."""
    lowered = sql.lower()
    if any(word in lowered for word in _TRIGGERS):
        return True
    if b"set" not in lowered:
        return False
    return b"--" in sql or b"/*" in sql or _LEADING_SET.search(lowered) is not None


def changes_session(sql: bytes) -> bool:
    """Whether any statement in `sql` may leave state in the session beyond its transaction."""
    if not _needs_lexing(sql):
        return False
    try:
        statements = _tokens(sql)
    except Unterminated:
        return True
    return any(_statement_changes_session(tokens) for tokens in statements)
