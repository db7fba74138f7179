"""Settings for the test suite: the base settings, with tasks that tests queue
sent to a broker folder of this test session, never into the development broker
that a local worker would later drain. Worker subprocesses started by the
integration tests inherit the folder through the environment."""

import os
import tempfile
from pathlib import Path

from .base import *  # noqa: F401,F403
from .base import CELERY_BROKER_URL, filesystem_broker_options

if CELERY_BROKER_URL.startswith("filesystem"):
    os.environ.setdefault("CELERY_BROKER_DIR", tempfile.mkdtemp(prefix="creditdesk-test-broker-"))
    CELERY_BROKER_TRANSPORT_OPTIONS = filesystem_broker_options(Path(os.environ["CELERY_BROKER_DIR"]))
