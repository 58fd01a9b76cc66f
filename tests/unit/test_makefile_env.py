"""How the Makefile reads `.env`: its values apply to every target, but a value in the
environment wins over `.env`'s, as the README's "Next to another MAOF on the same stack"
and `make dev`'s SSRF switch need. Shown with a copy of the Makefile in a temporary folder
and a rule added with --eval that only prints what a recipe sees."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MINE = "postgresql+psycopg://maof_app:maof_app@127.0.0.1:5432/maof_mine"
ALLOW_PRIVATE = "MAOF_ALLOW_PRIVATE_AGENT_ENDPOINTS"

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")


def seen_by_a_recipe(folder: Path, variable: str, **environ: str) -> str:
    """What a recipe of the Makefile in `folder` finds in `variable`, run with `environ`
    (and no other MAOF_* setting) in the environment."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("MAOF_")}
    done = subprocess.run(
        ["make", "-s", "-C", str(folder), "--eval", f'show: ; @echo "[$${variable}]"', "show"],
        env={**base, **environ},
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return done.stdout.strip()


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """The Makefile with `.env` copied from `.env.example`, as docs/operations.md says."""
    shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")
    shutil.copy(ROOT / ".env.example", tmp_path / ".env")
    return tmp_path


def set_in_env_file(folder: Path, variable: str, value: str) -> None:
    env_file = folder / ".env"
    text, count = re.subn(
        rf"^{variable}=.*$", f"{variable}={value}", env_file.read_text(), flags=re.M
    )
    assert count == 1, f"{variable} is not in .env.example"
    env_file.write_text(text)


def test_env_files_values_reach_the_recipes(project: Path) -> None:
    assert seen_by_a_recipe(project, "MAOF_REDIS_URL") == "[redis://127.0.0.1:6379/0]"


def test_an_exported_setting_wins_over_env_file(project: Path) -> None:
    """The README: export MAOF_DATABASE_URL=…/maof_mine, then `make migrate`, migrates
    maof_mine, not `.env`'s maof."""
    assert seen_by_a_recipe(project, "MAOF_DATABASE_URL", MAOF_DATABASE_URL=MINE) == f"[{MINE}]"


def test_an_exported_value_reaches_the_recipes_as_given(project: Path) -> None:
    # Neither a `$` nor a `#` (a password may hold either) is read as make syntax.
    url = "redis://:pa$$w#rd@127.0.0.1:6379/13"
    assert seen_by_a_recipe(project, "MAOF_REDIS_URL", MAOF_REDIS_URL=url) == f"[{url}]"


def test_an_empty_setting_in_the_environment_leaves_env_files_value(project: Path) -> None:
    """Empty means unset, as in the settings."""
    assert seen_by_a_recipe(project, "MAOF_PORT", MAOF_PORT="") == "[3000]"


@pytest.mark.parametrize(
    ("in_env_file", "environ", "expected"),
    [
        # make dev turns an empty value into true (devstack.dev); either place may say false.
        ("", {}, ""),
        ("false", {}, "false"),
        ("", {ALLOW_PRIVATE: "false"}, "false"),
        ("false", {ALLOW_PRIVATE: "true"}, "true"),
        ("true", {ALLOW_PRIVATE: "false"}, "false"),
        ("false", {ALLOW_PRIVATE: ""}, "false"),
    ],
)
def test_make_devs_ssrf_switch_in_the_environment_wins_over_env_file(
    project: Path, in_env_file: str, environ: dict[str, str], expected: str
) -> None:
    set_in_env_file(project, ALLOW_PRIVATE, in_env_file)
    assert seen_by_a_recipe(project, ALLOW_PRIVATE, **environ) == f"[{expected}]"
