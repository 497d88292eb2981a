"""A model source that cannot be loaded ends in one line naming the key and the source.

Params load checks what it can without the network (stitchvm/config.py `_check_model_source`: named sources, local
folders, hub-id syntax, the cache under HF_HUB_OFFLINE). Whether a hub id exists online, or a local folder has the
layout `from_pretrained` expects, shows only when a stage builds the model: the factories load under `loading`.
"""
from __future__ import annotations

from contextlib import contextmanager


class ModelSourceError(ValueError):
    """A backbone or reward source could not be loaded; the message starts with the key (`backbone.source`)."""


@contextmanager
def loading(key: str, source: str):
    """Turn the loaders' OSError (transformers and diffusers raise it for a missing repo, file or connection, with a
    paragraph of advice) into one line naming `key` and `source`."""
    try:
        yield
    except FileNotFoundError:
        raise  # already names its file (e.g. a missing part of the pretrained world)
    except OSError as e:
        reason = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise ModelSourceError(f"{key}: cannot load {source!r}: {reason.rstrip('.')}; check the hub id or folder "
                               f"(offline: HF_HUB_OFFLINE=1 with a cached id, or a local folder)") from None
