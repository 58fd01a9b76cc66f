"""What a published dashboard holds (infra/site.py): its files by object key."""

from __future__ import annotations

from infra.site import SITE_DIR

# Module scripts need a JavaScript type: the AWS CLI guesses it from the name, by the system's
# table (/etc/mime.types) or Python's, which name it one way or the other.
JAVASCRIPT = {"text/javascript", "application/javascript"}


def site_keys() -> set[str]:
    """The files the site is made of: not hidden ones, nor a checked-in config.json."""
    paths = (path.relative_to(SITE_DIR) for path in SITE_DIR.rglob("*") if path.is_file())
    keys = {path.as_posix() for path in paths if not any(p.startswith(".") for p in path.parts)}
    return keys - {"config.json"}
