"""The CLI's token store (owner-only, per API URL, written atomically) and its workflow
files (YAML or JSON, a workflow or a whole execute body)."""

from __future__ import annotations

import json
import stat
import threading
import time
from pathlib import Path

import pytest

from maof_client.config import CredentialsFile, CredentialsUnreadable, config_dir
from maof_client.models import Tokens
from maof_client.workflows import WorkflowFileError, read_execute_body, read_input


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_config_dir_follows_maof_config_dir_then_xdg_then_home(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("MAOF_CONFIG_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    assert config_dir() == tmp_path / "home" / ".config" / "maof"
    monkeypatch.setenv("XDG_CONFIG_HOME", "relative/is/ignored")
    assert config_dir() == tmp_path / "home" / ".config" / "maof"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert config_dir() == tmp_path / "xdg" / "maof"
    monkeypatch.setenv("MAOF_CONFIG_DIR", str(tmp_path / "explicit"))
    assert config_dir() == tmp_path / "explicit"


def test_credentials_are_owner_only(tmp_path: Path) -> None:
    directory = tmp_path / "maof"
    store = CredentialsFile("http://127.0.0.1:3000", directory)
    store.save(Tokens("access-1", "refresh-1", "ada@example.com"))
    assert mode(directory) == 0o700
    assert mode(store.path) == 0o600
    assert store.load() == Tokens("access-1", "refresh-1", "ada@example.com")


def test_a_group_readable_directory_is_closed_again(tmp_path: Path) -> None:
    directory = tmp_path / "maof"
    directory.mkdir(mode=0o755)
    directory.chmod(0o755)
    CredentialsFile("http://x", directory).save(Tokens("a", "r"))
    assert mode(directory) == 0o700


def test_credentials_are_kept_per_api_url(tmp_path: Path) -> None:
    local = CredentialsFile("http://127.0.0.1:3000/", tmp_path)
    deployed = CredentialsFile("https://api.example.com", tmp_path)
    local.save(Tokens("a-local", "r-local"))
    deployed.save(Tokens("a-prod", "r-prod"))
    assert CredentialsFile("http://127.0.0.1:3000", tmp_path).load() == Tokens("a-local", "r-local")
    deployed.clear()
    assert deployed.load() is None
    assert local.load() == Tokens("a-local", "r-local")
    servers = json.loads(local.path.read_text())["servers"]
    assert list(servers) == ["http://127.0.0.1:3000"]


def test_each_save_replaces_the_file_whole_and_leaves_no_temporary(tmp_path: Path) -> None:
    store = CredentialsFile("http://x", tmp_path)
    store.save(Tokens("a1", "r1"))
    first = store.path.stat().st_ino
    store.save(Tokens("a2", "r2"))
    assert store.path.stat().st_ino != first  # renamed over, not rewritten in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["credentials.json"]
    assert mode(store.path) == 0o600


def test_a_file_that_is_not_ours_is_an_error_naming_it(tmp_path: Path) -> None:
    (tmp_path / "credentials.json").write_text("[1, 2]")
    with pytest.raises(CredentialsUnreadable, match=r"credentials\.json"):
        CredentialsFile("http://x", tmp_path).load()


def test_no_file_means_not_signed_in(tmp_path: Path) -> None:
    assert CredentialsFile("http://x", tmp_path / "nothing-here").load() is None


def test_the_refresh_lock_excludes_other_holders(tmp_path: Path) -> None:
    store = CredentialsFile("http://x", tmp_path)
    inside: list[str] = []

    def hold(name: str) -> None:
        with store.exclusive():
            inside.append(f"{name}+")
            time.sleep(0.1)
            inside.append(f"{name}-")

    threads = [threading.Thread(target=hold, args=(n,)) for n in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert inside in (["a+", "a-", "b+", "b-"], ["b+", "b-", "a+", "a-"])
    assert mode(tmp_path / "credentials.lock") == 0o600


# ------------------------------------------------------------------ workflow files

WORKFLOW = {"name": "p", "stages": [{"id": "a", "name": "A", "agentCapability": "x"}]}


def test_a_yaml_workflow_becomes_an_execute_body(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(
        "name: p\nstages:\n  - id: a\n    name: A\n    agentCapability: x\n"
        "    input: {when: 2024-01-02, ref: '${workflow.input.text}'}\n"
    )
    body = read_execute_body(path)
    stage = body["workflow"]["stages"][0]
    assert stage["input"] == {"when": "2024-01-02", "ref": "${workflow.input.text}"}


def test_a_json_execute_body_is_taken_as_it_is(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    document = {"workflow": WORKFLOW, "input": {"text": "hi"}}
    path.write_text(json.dumps(document))
    assert read_execute_body(path) == document


def test_a_file_that_is_neither_shape_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("just: a mapping\n")
    with pytest.raises(WorkflowFileError, match="neither a workflow"):
        read_execute_body(path)
    path.write_text("workflow: {}\nextra: 1\n")
    with pytest.raises(WorkflowFileError, match="extra"):
        read_execute_body(path)
    path.write_text("stages: [unclosed\n")
    with pytest.raises(WorkflowFileError, match="not valid YAML"):
        read_execute_body(path)


def test_input_is_a_file_or_inline_json_or_stdin(tmp_path: Path) -> None:
    file = tmp_path / "input.yaml"
    file.write_text("text: from a file\n")
    assert read_input(str(file)) == {"text": "from a file"}
    assert read_input('{"text": "inline"}') == {"text": "inline"}
    assert read_input("-", '["stdin"]') == ["stdin"]
    with pytest.raises(WorkflowFileError, match="neither a file nor valid JSON"):
        read_input("plain words")


def test_the_example_workflows_read(tmp_path: Path) -> None:
    examples = Path(__file__).resolve().parents[2] / "examples" / "workflows"
    demo = read_execute_body(examples / "extract-translate-summarize.yaml")
    assert [s["id"] for s in demo["workflow"]["stages"]] == ["extract", "translate", "summarize"]
    assert demo["input"]["text"]
    failing = read_execute_body(examples / "missing-capability.yaml")
    assert "input" not in failing
