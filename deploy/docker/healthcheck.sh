#!/bin/sh
# The image's HEALTHCHECK: exit 0 when healthy, 1 when not (Docker's convention).
#   FEDMRI_ROLE=hospital     `fedmri client check`: data, kernels, CA, coordinator, enrollment
#                            (it exits non-zero when any of them is a problem)
#   FEDMRI_ROLE=coordinator  `fedmri server status` exits 0 also when the server is stopped, so
#                            its JSON is read: running, and both ports accept connections on
#                            FEDMRI_HEALTH_HOST (default 127.0.0.1: set it when --bind names
#                            one address)
#   unset                    a one-off command (`fedmri simulate`, `fedmri kernels info`, ...):
#                            nothing to check
set -eu
home="${FEDMRI_HOME:-/state}"
case "${FEDMRI_ROLE:-}" in
  hospital)
    exec fedmri client --home "$home" check ;;
  coordinator)
    fedmri server --home "$home" status --json | python3 -c '
import json, os, socket, sys
try:
    report = json.load(sys.stdin)
except ValueError:
    sys.exit("fedmri server status gave no report")
host = os.environ.get("FEDMRI_HEALTH_HOST", "127.0.0.1")
if not report.get("running"):
    sys.exit("fedmri server: not running")
for what in ("port", "enroll_port"):
    try:
        socket.create_connection((host, report[what]), timeout=5).close()
    except OSError as err:
        sys.exit(f"fedmri server: {what} {report[what]} on {host} refuses connections: {err}")
' ;;
  "")
    exit 0 ;;
  *)
    echo "fedmri-healthcheck: unknown FEDMRI_ROLE '$FEDMRI_ROLE' (hospital or coordinator)" >&2
    exit 1 ;;
esac
