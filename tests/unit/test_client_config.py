"""The CLI's token store (owner-only, per API URL, written atomically) and its workflow
files (YAML or JSON, a workflow or a whole execute body)."""

from __future__ import annotations

import json
import re
import stat
import threading
import time
from pathlib import Path

import pytest

from maof_client.config import (
    CredentialsFile,
    CredentialsUnreadable,
    CredentialsUnwritable,
    checked_api_url,
    config_dir,
)
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


def test_a_credentials_file_others_can_read_is_made_owner_only_with_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A file copied or restored from a backup as 0644 was used as it was, left readable
    by every local user."""
    directory = tmp_path / "maof"
    store = CredentialsFile("http://x", directory)
    store.save(Tokens("a", "r"))
    store.path.chmod(0o644)
    directory.chmod(0o755)
    assert store.load() == Tokens("a", "r")
    assert (mode(store.path), mode(directory)) == (0o600, 0o700)
    warning = f"Warning: {store.path} was readable by other users (mode 0644); made it 0600\n"
    assert capsys.readouterr().err == warning
    store.load()
    assert capsys.readouterr().err == ""  # said once: it is owner-only now


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


def test_a_directory_that_cannot_be_made_is_an_error_naming_it(tmp_path: Path) -> None:
    """MAOF_CONFIG_DIR under a regular file: every write was an OSError traceback."""
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    store = CredentialsFile("http://x", blocker / "maof")
    assert store.load() is None  # nothing is stored there: not signed in
    named = re.escape(f"Cannot store the credentials in {blocker / 'maof'} (Not a directory)")
    with pytest.raises(CredentialsUnwritable, match=f"{named}.*MAOF_CONFIG_DIR"):
        store.check_writable()
    with pytest.raises(CredentialsUnwritable, match=named):
        store.save(Tokens("a", "r"))
    with pytest.raises(CredentialsUnwritable, match=named), store.exclusive():
        pass


def test_check_writable_leaves_only_the_directory(tmp_path: Path) -> None:
    store = CredentialsFile("http://x", tmp_path / "maof")
    store.check_writable()
    assert list(store.directory.iterdir()) == [] and mode(store.directory) == 0o700


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


def test_inline_json_longer_than_a_file_name_is_read_as_json() -> None:
    """Taken for a file name first, a paragraph of inline JSON (a path component over 255
    bytes) made Path.is_file() raise ENAMETOOLONG."""
    paragraph = {"text": "a" * 300}
    assert read_input(json.dumps(paragraph)) == paragraph
    assert read_input(json.dumps(["a" * 300])) == ["a" * 300]
    assert read_input(json.dumps("a" * 300)) == "a" * 300
    with pytest.raises(WorkflowFileError, match="neither a file nor valid JSON"):
        read_input("a" * 300)  # no file, no JSON: said so, not an OSError


def test_a_file_whose_name_starts_as_json_does_is_still_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    Path("[draft].yaml").write_text("text: from the file\n")
    assert read_input("[draft].yaml") == {"text": "from the file"}


def test_a_file_that_is_not_utf8_is_a_workflow_file_error(tmp_path: Path) -> None:
    workflow = tmp_path / "latin1.yaml"
    workflow.write_bytes("name: café\nstages: []\n".encode("latin-1"))
    with pytest.raises(WorkflowFileError, match=r"latin1\.yaml is not UTF-8 text \(byte 0xe9"):
        read_execute_body(workflow)
    data = tmp_path / "input.json"
    data.write_bytes(b'{"text": "caf\xe9"}')
    with pytest.raises(WorkflowFileError, match=r"input\.json is not UTF-8 text"):
        read_input(str(data))


def test_a_utf8_file_starting_with_a_byte_order_mark_is_read(tmp_path: Path) -> None:
    """Notepad, PowerShell and Excel start UTF-8 so: json refused such a .json file ("not
    valid JSON: Unexpected UTF-8 BOM"), while the same file named .yaml was read."""
    body = {"workflow": WORKFLOW, "input": {"text": "café"}}
    for name in ("wf.json", "wf.yaml"):
        path = tmp_path / name
        path.write_bytes(json.dumps(body, ensure_ascii=False).encode("utf-8-sig"))
        assert read_execute_body(path) == body
    data = tmp_path / "input.json"
    data.write_bytes('{"text": "café"}'.encode("utf-8-sig"))
    assert read_input(str(data)) == {"text": "café"}
    data.write_bytes(b'\xef\xbb\xbf{"text": "caf\xe9"}')  # the mark, then Latin-1
    with pytest.raises(WorkflowFileError, match=r"\(byte 0xe9 at offset 16\)"):  # in the file
        read_input(str(data))


@pytest.mark.parametrize(
    ("value", "where", "number"),
    [
        ('{"x": NaN}', "x", "NaN"),
        ('{"a": [1, {"b": Infinity}]}', r"a\[1\]\.b", "Infinity"),
        ("-Infinity", "the value", "-Infinity"),
        ('{"big": 1e999}', "big", "Infinity"),  # json reads an overflow as infinity
    ],
)
def test_inline_input_with_nan_or_infinity_is_refused_naming_where(
    value: str, where: str, number: str
) -> None:
    with pytest.raises(WorkflowFileError, match=rf"--input: {where} is {number}, and JSON has no"):
        read_input(value)


def test_yaml_and_json_files_with_nan_or_infinity_are_refused(tmp_path: Path) -> None:
    data = tmp_path / "in.yaml"
    data.write_text("x: .inf\ny: [1, .nan]\n")
    with pytest.raises(WorkflowFileError, match=r"in\.yaml: x is Infinity"):
        read_input(str(data))
    workflow = tmp_path / "p.yaml"
    workflow.write_text(
        "name: p\nstages: [{id: a, name: A, agentCapability: x, input: {t: -.inf}}]\n"
    )
    with pytest.raises(WorkflowFileError, match=r"stages\[0\]\.input\.t is -Infinity"):
        read_execute_body(workflow)
    body = tmp_path / "p.json"
    body.write_text(json.dumps({"workflow": WORKFLOW, "input": {"n": 1.5}})[:-1] + ', "z": NaN}')
    with pytest.raises(WorkflowFileError, match=r"p\.json: z is NaN"):
        read_execute_body(body)
    with pytest.raises(WorkflowFileError, match="standard input: the value is NaN"):
        read_input("-", "NaN")


def test_a_file_or_input_nested_too_deeply_is_a_workflow_file_error(tmp_path: Path) -> None:
    """json and yaml recurse once per level: a RecursionError came out as a traceback."""
    deep_json = tmp_path / "deep.json"
    deep_json.write_text("[" * 100_000 + "]" * 100_000)
    deep_yaml = tmp_path / "deep.yaml"
    deep_yaml.write_text("name: x\nstages: " + "[" * 5000 + "]" * 5000 + "\n")
    for path in (deep_json, deep_yaml):
        with pytest.raises(WorkflowFileError, match=f"{path.name} nests lists or objects too"):
            read_execute_body(path)
    with pytest.raises(WorkflowFileError, match="--input nests lists or objects too deeply"):
        read_input("[" * 100_000)
    with pytest.raises(WorkflowFileError, match="standard input nests lists or objects"):
        read_input("-", "[" * 100_000)
    # Read, but too deep to encode for sending (json recurses there too): refused as well.
    with pytest.raises(WorkflowFileError, match=r"--input nests .* \(more than 512 levels\)"):
        read_input("[" * 980 + "]" * 980)
    assert read_input("[" * 512 + "]" * 512) is not None  # as deep as any API takes


@pytest.mark.parametrize(
    ("url", "checked"),
    [
        ("http://127.0.0.1:3000/", "http://127.0.0.1:3000"),
        ("https://api.example.com/maof", "https://api.example.com/maof"),
    ],
)
def test_an_api_url_is_http_or_https_with_a_host(url: str, checked: str) -> None:
    assert checked_api_url(url) == checked


@pytest.mark.parametrize(
    "url", ["localhost:3000", "api.example.com", "ftp://api.example.com", "http://", "http://h:x"]
)
def test_an_api_url_without_scheme_or_host_is_refused(url: str) -> None:
    with pytest.raises(ValueError, match=re.escape(repr(url))):
        checked_api_url(url)
