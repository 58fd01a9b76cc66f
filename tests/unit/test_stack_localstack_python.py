"""Which interpreter LocalStack's virtualenv is built on: Python 3.13, found without pyenv on
PATH, or a clear refusal (the last localstack-core for older Pythons cannot serve SQS)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from devstack import stack


def _fake_python(root: Path, version: str) -> Path:
    python = root / "versions" / version / "bin" / "python3"
    python.parent.mkdir(parents=True)
    python.symlink_to(sys.executable)  # a real interpreter, so `import venv` works
    return python


def test_pyenv_313_is_found_when_pyenv_is_not_on_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_python(tmp_path, "3.12.1")
    wanted = _fake_python(tmp_path, "3.13.0")
    monkeypatch.setenv("PYENV_ROOT", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert stack.localstack_python() == str(wanted)


def test_without_python_313_it_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_python(tmp_path, "3.12.1")
    monkeypatch.setenv("PYENV_ROOT", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(SystemExit, match=r"LocalStack needs Python 3\.13.*pyenv install 3\.13\.0"):
        stack.localstack_python()
