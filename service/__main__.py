"""``python -m service``: run the service from ``LOOKALIKE_*`` settings (what ``lookalike serve``
execs into, so torch is first imported by the inference thread)."""

from __future__ import annotations

import logging
import os
import sys


def main() -> int:
    logging.basicConfig(
        level=getattr(logging, os.environ.get("LOOKALIKE_LOG", "INFO").upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    from service.server import load_settings, run

    logging.getLogger("service").info("python -m service (pid %d): torch imported: %s", os.getpid(),
                                      "torch" in sys.modules)

    try:
        return run(load_settings())
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError, PermissionError, RuntimeError) as exc:
        print(f"lookalike: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
