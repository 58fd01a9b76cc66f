"""Where the CLI keeps its tokens: one credentials file, per API URL, readable by its owner only.

`~/.config/maof/credentials.json` (under `$XDG_CONFIG_HOME` when set; `$MAOF_CONFIG_DIR`
replaces the whole directory, for tests and several profiles). The directory is 0700, the
file 0600 (made so again, with a warning, when found readable by others), written whole to
a temporary file and renamed over the old one, so a reader never sees half a file and a
crash never loses the pair. Refreshes hold an exclusive lock
on `credentials.lock`, so two `maof` processes never present the same refresh token (the
API would end the session: refresh tokens rotate).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import stat
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from maof_client.errors import MaofError
from maof_client.models import Tokens

DEFAULT_API_URL = "http://127.0.0.1:3000"
CREDENTIALS_FILE = "credentials.json"
LOCK_FILE = "credentials.lock"
FORMAT_VERSION = 1


def config_dir() -> Path:
    """$MAOF_CONFIG_DIR, else $XDG_CONFIG_HOME/maof, else ~/.config/maof."""
    explicit = os.environ.get("MAOF_CONFIG_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CONFIG_HOME")
    if xdg and os.path.isabs(xdg):  # the XDG spec: a relative value is to be ignored
        return Path(xdg) / "maof"
    return Path.home() / ".config" / "maof"


def checked_api_url(url: str) -> str:
    """`url` without a trailing slash, if it can name an API: http or https, with a host
    (`localhost:3000` or `api.example.com` alone would be read as a scheme or a path);
    ValueError saying what to write otherwise."""
    parsed = urlsplit(url.strip())
    try:
        parsed.port  # noqa: B018 (raises ValueError on a port that is not a number)
    except ValueError:
        raise ValueError(f"{url!r} has a port that is not a number") from None
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ValueError(
            f"{url!r} is not an http:// or https:// URL with a host "
            f"(e.g. {DEFAULT_API_URL}, or https://api.example.com)"
        )
    return url.strip().rstrip("/")


def api_url_key(url: str) -> str:
    """Credentials are keyed by the API's URL, without a trailing slash."""
    return url.rstrip("/")


class CredentialsFile:
    """The token pair of one API URL in the shared credentials file (a `TokenStore`)."""

    def __init__(self, api_url: str, directory: Path | None = None) -> None:
        self.api_url = api_url_key(api_url)
        self.directory = directory if directory is not None else config_dir()

    @property
    def path(self) -> Path:
        return self.directory / CREDENTIALS_FILE

    def load(self) -> Tokens | None:
        self._tighten()
        entry = self._read().get("servers", {}).get(self.api_url)
        if not isinstance(entry, dict):
            return None
        access, refresh = entry.get("accessToken"), entry.get("refreshToken")
        if not isinstance(access, str) or not isinstance(refresh, str):
            return None
        email = entry.get("email")
        return Tokens(access, refresh, email if isinstance(email, str) else None)

    def save(self, tokens: Tokens) -> None:
        document = self._read()
        servers = document.setdefault("servers", {})
        servers[self.api_url] = {
            "accessToken": tokens.access_token,
            "refreshToken": tokens.refresh_token,
            "email": tokens.email,
        }
        self._write(document)

    def clear(self) -> None:
        document = self._read()
        if document.get("servers", {}).pop(self.api_url, None) is not None:
            self._write(document)

    def check_writable(self) -> None:
        """Raise CredentialsUnwritable unless tokens can be stored here: asked before
        signing in, so no session is opened whose tokens would be lost."""
        with self._writing():
            self._ensure_directory()
            descriptor, temporary = tempfile.mkstemp(
                dir=self.directory, prefix=".credentials-", suffix=".tmp"
            )
            os.close(descriptor)
            os.unlink(temporary)

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Held across read-refresh-write: one process at a time rotates the tokens."""
        with self._writing():
            self._ensure_directory()
            descriptor = os.open(self.directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
            yield
        finally:
            os.close(descriptor)  # closing releases the lock

    def _read(self) -> dict[str, Any]:
        try:
            document = json.loads(self.path.read_text(encoding="utf-8"))
        except (FileNotFoundError, NotADirectoryError):  # nothing stored here (yet)
            return {"version": FORMAT_VERSION, "servers": {}}
        except (OSError, ValueError) as exc:
            raise CredentialsUnreadable(f"{self.path} cannot be read ({exc}); delete it") from None
        if not isinstance(document, dict) or not isinstance(document.get("servers"), dict):
            raise CredentialsUnreadable(f"{self.path} is not a MAOF credentials file; delete it")
        return document

    def _write(self, document: dict[str, Any]) -> None:
        document["version"] = FORMAT_VERSION
        with self._writing():
            self._ensure_directory()
            # mkstemp creates the file 0600; rename is atomic within one directory.
            descriptor, temporary = tempfile.mkstemp(
                dir=self.directory, prefix=".credentials-", suffix=".tmp"
            )
            try:
                with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
                    json.dump(document, handle, indent=2, sort_keys=True)
                    handle.flush()
                    os.fsync(handle.fileno())
                os.chmod(temporary, 0o600)
                os.replace(temporary, self.path)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(temporary)
                raise

    def _tighten(self) -> None:
        """A file that others may read (copied, restored from a backup) made 0600 again,
        its directory 0700, with a warning on stderr: its tokens may have been read."""
        try:
            loose = stat.S_IMODE(self.path.stat().st_mode)
        except OSError:
            return  # nothing stored; a file that cannot be read is _read's to report
        if not loose & 0o077:
            return
        try:
            os.chmod(self.path, 0o600)
            if self.directory.stat().st_mode & 0o077:
                os.chmod(self.directory, 0o700)
        except OSError as exc:
            _warn(f"{self.path} is readable by other users and cannot be made 0600 ({exc})")
            return
        _warn(f"{self.path} was readable by other users (mode {loose:04o}); made it 0600")

    def _ensure_directory(self) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self.directory.stat().st_mode & 0o077:
            os.chmod(self.directory, 0o700)

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """An OSError inside (a HOME that is not writable, a directory under a file) as a
        CredentialsUnwritable naming the directory and how to choose another."""
        try:
            yield
        except OSError as exc:
            raise CredentialsUnwritable(
                f"Cannot store the credentials in {self.directory} "
                f"({exc.strerror or type(exc).__name__}): make it writable, or set "
                "MAOF_CONFIG_DIR to a directory you can write"
            ) from None


def _warn(message: str) -> None:
    sys.stderr.write(f"Warning: {message}\n")


class CredentialsUnreadable(MaofError):
    """The credentials file exists but is not one this client wrote."""

    code = "CREDENTIALS_UNREADABLE"


class CredentialsUnwritable(MaofError):
    """The credentials directory cannot be made, or the file written, where they are kept."""

    code = "CREDENTIALS_UNWRITABLE"
