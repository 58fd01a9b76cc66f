"""docs/operations.md says what MAOF keeps and for how long: its Data retention section
names every table MAOF stores, and says what the sweeper deletes as the code does it."""

from __future__ import annotations

import re
from pathlib import Path

from chalicelib.db import roles
from chalicelib.db.models import SUBMISSION_KEY_DAYS, Base
from chalicelib.engine import sweeper

PAGE = Path(__file__).resolve().parents[2] / "docs" / "operations.md"


def retention_section() -> str:
    found = re.search(r"^## Data retention\n(.*?)(?=^## )", PAGE.read_text(), re.S | re.M)
    assert found, "docs/operations.md has no Data retention section"
    return found.group(1)


def test_the_operations_guide_says_how_long_each_table_is_kept() -> None:
    section = retention_section()
    tables = {*Base.metadata.tables, *roles.APPEND_ONLY_TABLES}
    unsaid = sorted(table for table in tables if f"`{table}`" not in section)
    assert not unsaid, f"docs/operations.md's Data retention section does not name {unsaid}"


def test_the_operations_guide_says_what_the_sweeper_deletes_as_it_does() -> None:
    section = retention_section()
    # The ages the section gives ("a day"): change them there with these.
    assert (SUBMISSION_KEY_DAYS, sweeper.SESSION_KEPT_AFTER_EXPIRY) == (1, "1 day")
    assert "deleted by the sweeper once a day old" in section
    assert "deleted by the sweeper a day after they expire" in section
    assert f"at most {sweeper.PRUNE_BATCH:,} keys and {sweeper.PRUNE_BATCH:,} sessions" in section
