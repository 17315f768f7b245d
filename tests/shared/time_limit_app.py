"""A Celery app for tests/shared/test_time_limits.py: voxelflow's app factory and one task that overstays.

Run by a real ``celery -A tests.shared.time_limit_app worker -P solo`` process, as the services' workers run.
"""

from __future__ import annotations

import os
import time

from celery.exceptions import SoftTimeLimitExceeded

from shared.tasks import create_celery_app

QUEUE = "time-limit-test"
app = create_celery_app(QUEUE, os.environ["VOXELFLOW_BROKER_URL"], os.environ["VOXELFLOW_DATABASE_URL"])


@app.task(name="test.overstay", soft_time_limit=1, time_limit=3, max_retries=0, autoretry_for=())
def overstay(seconds: float, ignore_soft_limit: bool) -> str:
    """Sleeps ``seconds``; at the soft limit it stops cleanly, unless told to ignore it (then the hard one ends it)."""
    try:
        time.sleep(seconds)
    except SoftTimeLimitExceeded:
        if not ignore_soft_limit:
            return "stopped at the soft limit"
        time.sleep(seconds)
    return "slept"
