"""The one exception type for a user's mistake: a bad config, file, folder, argument or address.

The validation and input layers raise `UserError`; the CLI reports it as one line naming the field or file,
with no traceback. It stays a `ValueError` so callers that catch those keep working. Any other exception,
including a `ValueError` raised inside an engine or trainer worker (which `ray.get` re-raises as a
`RayTaskError` that is also a `ValueError`), is an internal error: the CLI saves its traceback to a file.
"""

from __future__ import annotations


class UserError(ValueError):
    """A mistake in what the user gave (config, data, folders, arguments, addresses); the message names it."""
