"""`.env.example` documents every setting the code reads."""

import re
from pathlib import Path

from chalicelib.config import ENV_PREFIX, Settings

ROOT = Path(__file__).resolve().parents[2]


def test_env_example_lists_every_maof_variable_the_code_reads():
    # Every field of Settings, and the few variables read outside it (the local stack's).
    used = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    for path in [*ROOT.joinpath("chalicelib").rglob("*.py"), ROOT / "app.py"]:
        used |= set(re.findall(r"\"(MAOF_[A-Z0-9_]+)\"", path.read_text()))
    documented = set(re.findall(r"^(MAOF_[A-Z0-9_]+)=", (ROOT / ".env.example").read_text(), re.M))
    assert used - documented == set()
