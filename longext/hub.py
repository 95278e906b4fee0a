"""A `model.path` that is not a local folder is a Hugging Face hub name: say at once when it cannot be fetched.

Offline (HF_HUB_OFFLINE=1) only the hub cache can serve it; online the hub must be reachable. Without this check
transformers retries an unreachable hub for about half a minute before its own multi-line error.
"""

from __future__ import annotations

import os
import re
import socket
from urllib.parse import urlsplit

HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # owner/name; a bare name or a longer path is a folder
PROBE_SECONDS = 3.0


def hub_problem(path: str, field: str) -> str | None:
    """None when `path` (not an existing folder) can be fetched from the hub or its cache; else the error line."""
    if not HUB_NAME.fullmatch(path) or path.startswith("."):
        return f"{field}: no such model directory: {path!r} (for the offline SmolLM2 run `longext models prepare smollm2`)"
    if in_hub_cache(path):
        return None
    folder = f"{path!r} is not a local directory, and as a hub name"
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return (f"{field}: {folder} it cannot be downloaded: HF_HUB_OFFLINE is set and the hub cache has no copy "
                f"(download it once without HF_HUB_OFFLINE, or give a local model directory)")
    unreachable = unreachable_reason()
    if unreachable:
        return (f"{field}: {folder} it cannot be downloaded: the hub is unreachable ({unreachable}); give a local "
                f"model directory, or set HF_ENDPOINT / a proxy")
    return None


def in_hub_cache(name: str) -> bool:
    """The hub cache (HF_HOME) holds the config of `name`, so transformers can load it without the network."""
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(name, "config.json"), str)


def unreachable_reason() -> str | None:
    """Why the hub (HF_ENDPOINT, or the HTTPS proxy when one is set) cannot be reached, from one TCP connection
    attempt of at most PROBE_SECONDS; None when it answers."""
    url = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy") or os.environ.get("HF_ENDPOINT") \
        or "https://huggingface.co"
    parts = urlsplit(url if "://" in url else f"http://{url}")
    host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=PROBE_SECONDS):
            return None
    except socket.gaierror:
        return f"cannot resolve {host}"
    except TimeoutError:
        return f"{host}:{port} did not answer within {PROBE_SECONDS:.0f} s"
    except OSError as err:
        return f"{host}:{port}: {err.strerror or err}"
