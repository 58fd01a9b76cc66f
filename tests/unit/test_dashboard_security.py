"""The dashboard's security invariants, read from its files: a patched js-yaml, and a site
that needs nothing a strict Content-Security-Policy forbids."""

from __future__ import annotations

import re
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parents[2]
SITE_DIR = PROJECT_DIR / "dashboard"
JS_YAML = SITE_DIR / "vendor" / "js-yaml.js"
# CVE-2025-64718 (prototype pollution through the YAML merge key `<<`): fixed in 4.1.1.
JS_YAML_FIXED = (4, 1, 1)


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def test_the_vendored_js_yaml_is_a_patched_release() -> None:
    banner = next(line for line in JS_YAML.read_text().splitlines() if line.strip())
    found = re.fullmatch(r"/\*! js-yaml (\d+\.\d+\.\d+) \S+ @license MIT \*/", banner)
    assert found, f"no js-yaml version banner in {JS_YAML}: {banner!r}"
    assert _version(found.group(1)) >= JS_YAML_FIXED, (
        f"js-yaml {found.group(1)} is affected by CVE-2025-64718: vendor 4.1.1 or later"
    )
    assert (SITE_DIR / "vendor" / "js-yaml.LICENSE.txt").read_text().startswith("(The MIT License)")
