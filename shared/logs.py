"""Logging set-up shared by every labq process (one format, level from LABQ_LOG_LEVEL)."""

from __future__ import annotations

import logging
import os


def setup_logging(service: str, level: str | None = None) -> None:
    level = (level or os.environ.get("LABQ_LOG_LEVEL") or "INFO").upper()
    logging.basicConfig(
        level=getattr(logging, level, logging.INFO),
        format=f"%(asctime)s %(levelname)-7s {service}[%(process)d] %(name)s: %(message)s",
    )
    # pika is chatty at INFO about every connection attempt; its warnings still show.
    logging.getLogger("pika").setLevel(logging.WARNING)
