"""The two kinds of failure a user must tell apart: their input is wrong (exit 2) or something broke (exit 1)."""

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_INVALID_INPUT = 2


class InputError(Exception):
    """The user's input (manifest, checkpoint, image, CSV, URI) is invalid; retrying cannot help.

    `where` names the field path or file so the message is actionable on its own.
    """

    exit_code = EXIT_INVALID_INPUT

    def __init__(self, message: str, where: str | None = None):
        self.where = where
        self.message = message
        super().__init__(f"{where}: {message}" if where else message)


def require_same_plan(found: dict | None, expected: dict, where: str, holds: str, remedy: str) -> None:
    """Refuse (InputError at `where`) outputs committed under another plan than `expected`, naming the keys that
    differ: mixing results of two plans would silently corrupt what is measured from them."""
    if found == expected:
        return
    differing = sorted(k for k in set(expected) | set(found or {}) if (found or {}).get(k) != expected.get(k))
    raise InputError(f"holds {holds} of a different plan (differs in: {', '.join(differing)}); {remedy}", where=where)


class StorageError(Exception):
    """The output store failed in a way the user's input did not cause: S3 down past the retry budget, a full
    disk. The message names the location; retrying later (or elsewhere) can succeed, so the exit code is 1."""

    exit_code = EXIT_FAILURE

    def __init__(self, message: str, where: str | None = None):
        self.where = where
        super().__init__(f"{where}: {message}" if where else message)
