"""Pages of a console list, newest first, with an opaque cursor and a search (pure).

A page holds at most `size` rows; its cursor names the last row shown (creation time and id, the
same shape as the API's `pagination.cursor`), and the next page starts after it. A search matches
a name (any case) or an id (any part of it). What a page costs is what it shows: the console's
Projects page at 1,000 projects renders 50 rows, not 1,000.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Generic, TypeVar

from argon.errors import UserError

T = TypeVar("T")
PAGE_SIZE = 50


def cursor(created_at: datetime, key: str) -> str:
    raw = json.dumps([created_at.isoformat(), key]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def uncursor(value: str, what: str) -> tuple[datetime, str]:
    try:
        when, key = json.loads(base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)))
        return datetime.fromisoformat(when), str(key)
    except Exception:
        raise UserError(f"that page of {what} does not exist; start again from the newest") from None


def matches(search: str, name: str, key: str) -> bool:
    """A name containing `search` in any case, or an id containing it."""
    needle = search.strip()
    return not needle or needle.lower() in name.lower() or needle in key


@dataclass(frozen=True)
class Page(Generic[T]):
    rows: list[T]
    older: str | None  # the cursor of the next page, None on the last one
    paged: bool  # not the first page
    search: str
    total: int  # rows matching the search, on every page


def newest_first(items: Sequence[T], *, key: Callable[[T], tuple[datetime, str]], name: Callable[[T], str],
                 search: str = "", before: str | None = None, what: str = "the list",
                 size: int = PAGE_SIZE) -> Page[T]:
    """The page of `items` (oldest first, as the view lists them) that starts after `before`,
    newest first, among those matching `search`."""
    after = uncursor(before, what) if before else None
    found = [item for item in reversed(items) if matches(search, name(item), key(item)[1])]
    start = 0
    if after is not None:
        start = next((i for i, item in enumerate(found) if key(item) < after), len(found))
    rows = found[start:start + size]
    more = start + size < len(found)
    return Page(rows=rows, older=cursor(*key(rows[-1])) if more and rows else None, paged=after is not None,
                search=search.strip(), total=len(found))


def in_order(items: Sequence[T], *, ident: Callable[[T], str], name: Callable[[T], str], search: str = "",
             after: str | None = None, what: str = "the list", size: int = PAGE_SIZE) -> Page[T]:
    """The page of `items`, in their own order (a tree's), that starts after the item whose id is
    `after`, among those matching `search`."""
    found = [item for item in items if matches(search, name(item), ident(item))]
    start = 0
    if after:
        at = next((i for i, item in enumerate(found) if ident(item) == after), None)
        if at is None:
            raise UserError(f"that page of {what} does not exist any more; start again from the first")
        start = at + 1
    rows = found[start:start + size]
    more = start + size < len(found)
    return Page(rows=rows, older=ident(rows[-1]) if more and rows else None, paged=bool(after),
                search=search.strip(), total=len(found))
