"""The default shared secret: a random key in a per-user file, keyed by port.

The file is created with mode 0600 inside a 0700 directory owned by the user, under
``$XDG_RUNTIME_DIR`` where set, else the temp dir. A directory that another user owns,
or that others can read, is refused: it could have been planted to learn the key.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
import tempfile
from pathlib import Path

from ._errors import ConfigurationError

KEY_BYTES = 32


def secret_dir() -> Path:
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    return Path(base) / f"connshare-{os.getuid()}"


def secret_path(port: int) -> Path:
    return secret_dir() / f"port-{port}.key"


def _safe_dir(path: Path) -> None:
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise ConfigurationError(f"{path} is not a directory owned by uid {os.getuid()}; refusing to keep a secret there")
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise ConfigurationError(f"{path} is accessible to other users (mode {stat.S_IMODE(st.st_mode):o}); expected 0700")


def load_or_create_secret(port: int) -> bytes:
    """The key for ``port``, creating it atomically on first use."""
    directory = secret_dir()
    _safe_dir(directory)
    path = secret_path(port)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            # Write a complete temp file, then link it in: a racing process either
            # wins the link or reads the winner's whole file.
            tmp = directory / f".port-{port}.{os.getpid()}.{secrets.token_hex(4)}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            try:
                os.write(fd, secrets.token_hex(KEY_BYTES).encode())
            finally:
                os.close(fd)
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass
            finally:
                os.unlink(tmp)
            continue
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # O_NOFOLLOW met a symlink: planted, maybe
                raise ConfigurationError(f"secret file {path} is a symlink; refusing to use it") from None
            raise
        try:
            st = os.fstat(fd)
            if st.st_uid != os.getuid() or stat.S_IMODE(st.st_mode) & 0o077:
                raise ConfigurationError(f"secret file {path} must be owned by this user with mode 0600")
            data = os.read(fd, 4 * KEY_BYTES).strip()
        finally:
            os.close(fd)
        if len(data) >= 32:
            return data
        raise ConfigurationError(f"secret file {path} is corrupt; delete it")
    raise ConfigurationError(f"could not create secret file {path}")
