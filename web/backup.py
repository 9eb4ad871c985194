"""Online backup and restore of the SQLite job store.

``python -m web.backup DEST`` copies the database at ``DATABASE_PATH`` (read from the
environment and ``.env``, as the service reads it) to ``DEST`` while the service runs, with
SQLite's online backup API: the copy holds every transaction committed when it started, and the
service goes on writing meanwhile (WAL: the copy's read transaction blocks no writer). The copy is
written beside ``DEST``, checked (``PRAGMA quick_check``), made a single self-contained file
(rollback journal, no ``-wal``), synced, and only then renamed to ``DEST``.

``python -m web.backup --restore SRC`` puts a copy back: with the service stopped (refused while
a process holds ``DATABASE_PATH.lock``), it checks ``SRC`` and copies it into ``DATABASE_PATH``
through the same API, so a ``-wal`` file of the database it replaces can never be applied to it.
The next start migrates it forward if it comes from an older release, and carries its unfinished
jobs on.

Images (``IMAGES_DIR``) are plain files: back them up after the database (a file whose job the
copy does not know is harmless; the reverse is a 404 for that image).
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
from pathlib import Path

from actors.errors import StoreUnavailable
from actors.store.sqlite import SCHEMA_VERSION, lock_database
from web.settings import SettingsError, load_settings

#: Pages copied per step of the backup API: -1 copies all in one read transaction, which a WAL
#: writer never waits for, so the copy cannot be restarted by the service's commits.
ALL_PAGES = -1


class BackupError(RuntimeError):
    """The backup or restore cannot be made; the message says why."""


def _open_existing(path: Path) -> sqlite3.Connection:
    """``path`` opened read-only (never created), checked to be a database this release reads."""
    if not path.is_file():
        raise BackupError(f"no database at {str(path)!r}")
    try:
        connection = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        (version,) = connection.execute("PRAGMA user_version").fetchone()
    except sqlite3.Error as exc:
        raise BackupError(f"{str(path)!r} is not a usable database: {exc}") from None
    if version > SCHEMA_VERSION:
        connection.close()
        raise BackupError(
            f"{str(path)!r} has schema version {version}, newer than this release's "
            f"({SCHEMA_VERSION})"
        )
    return connection


def _check(connection: sqlite3.Connection, what: str) -> None:
    (result,) = connection.execute("PRAGMA quick_check").fetchone()
    if result != "ok":
        raise BackupError(f"{what} failed its check: {result}")


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def backup(database: Path, destination: Path) -> int:
    """Copy ``database`` to ``destination`` (replacing it), online; the number of jobs copied.

    Raises:
        BackupError: The database is missing or unusable, or the copy cannot be written.
    """
    partial = destination.with_name(f".{destination.name}.partial")
    source = _open_existing(database)
    try:
        partial.unlink(missing_ok=True)
        target = sqlite3.connect(partial)
        try:
            source.backup(target, pages=ALL_PAGES)
            target.execute("PRAGMA journal_mode = DELETE")  # one file, no -wal beside it
            _check(target, "the copy")
            (jobs,) = target.execute("SELECT count(*) FROM jobs").fetchone()
        finally:
            target.close()
        _fsync(partial)
        partial.replace(destination)
        _fsync(destination.parent)
    except (OSError, sqlite3.Error) as exc:
        partial.unlink(missing_ok=True)
        raise BackupError(f"cannot write {str(destination)!r}: {exc}") from None
    finally:
        source.close()
    assert isinstance(jobs, int)
    return jobs


def restore(source_path: Path, database: Path) -> int:
    """Replace ``database`` with the copy at ``source_path``; the number of jobs restored.

    Raises:
        BackupError: The service holds the database, or the copy is missing or unusable.
    """
    try:
        lock = lock_database(database)
    except StoreUnavailable as exc:
        raise BackupError(f"stop the service first: {exc}") from None
    try:
        source = _open_existing(source_path)
        try:
            _check(source, str(source_path))
            target = sqlite3.connect(database)
            try:
                source.backup(target, pages=ALL_PAGES)
                (jobs,) = target.execute("SELECT count(*) FROM jobs").fetchone()
            finally:
                target.close()
        finally:
            source.close()
    except sqlite3.Error as exc:
        raise BackupError(f"cannot restore into {str(database)!r}: {exc}") from None
    finally:
        os.close(lock)
    assert isinstance(jobs, int)
    return jobs


def main(argv: list[str] | None = None) -> None:
    """``python -m web.backup DEST`` or ``python -m web.backup --restore SRC``; exit 2 on error."""
    parser = argparse.ArgumentParser(
        prog="python -m web.backup",
        description="Back up the job store while the service runs, or restore a backup.",
    )
    parser.add_argument(
        "path",
        type=Path,
        help="where to write the backup (or, with --restore, the backup to put back)",
    )
    parser.add_argument(
        "--restore",
        action="store_true",
        help="restore PATH into DATABASE_PATH (the service must be stopped)",
    )
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
        if settings.store.backend != "sqlite":
            raise BackupError("STORE is not sqlite: there is no database to back up")
        database = settings.store.database_path
        if args.restore:
            jobs = restore(args.path, database)
            sys.stdout.write(f"restored {jobs} jobs from {args.path} into {database}\n")
        else:
            jobs = backup(database, args.path)
            sys.stdout.write(f"backed up {jobs} jobs from {database} to {args.path}\n")
    except (SettingsError, BackupError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
