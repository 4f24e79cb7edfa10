"""Log lines are structured, and a line written during a request carries its
trace and span ids."""

from __future__ import annotations

import json
import subprocess
import sys

PROGRAM = """
import logging
from opentelemetry.sdk.trace import TracerProvider
from cachecoord import telemetry

telemetry.configure_logging("INFO", json_lines=True)
tracer = TracerProvider().get_tracer("test")
with tracer.start_as_current_span("request") as span:
    logging.getLogger("cachecoord.test").warning("inside %s", "a request")
    context = span.get_span_context()
    print(format(context.trace_id, "032x"), format(context.span_id, "016x"))
logging.getLogger("cachecoord.test").info("outside")
"""


def test_json_log_lines_carry_the_trace_and_span_ids() -> None:
    done = subprocess.run(
        [sys.executable, "-c", PROGRAM], capture_output=True, text=True, timeout=60, check=True
    )
    trace_id, span_id = done.stdout.split()
    inside, outside = (json.loads(line) for line in done.stderr.splitlines())
    assert inside["message"] == "inside a request"
    assert inside["level"] == "WARNING"
    assert (inside["trace_id"], inside["span_id"]) == (trace_id, span_id)
    assert (outside["trace_id"], outside["span_id"]) == ("", "")
