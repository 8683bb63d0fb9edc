"""Names of the files a run writes, and of the enrollment files its processes share."""

# In a run's output folder (the ServerApp's `out-dir`; `fedmri simulate --out`).
EVENTS = "events.jsonl"  # fedmri.proto.events
SERVER_STATE = "server_state.json"  # the config and the finished rounds: what a restart resumes
GLOBAL_MODEL = "global_model.pt"  # fedmri.common.models.load_model reads it
REPORT = "report.json"  # fedmri.proto.report
CURVES = "curves.png"
SAMPLE = "sample.png"

# Benchmarks: a variant's ServerApp writes BENCH_RESULT; `fedmri bench secagg` BENCH_SECAGG.
BENCH_RESULT = "bench.json"
BENCH_SECAGG = "bench-secagg.json"

# Enrollment: a hospital's identity key, and the coordinator's pinned set of public keys.
IDENTITY_KEY = "identity.pem"
PINNED_KEYS = "pinned-keys.json"

# A cohort folder is complete once its manifest exists (written last).
COHORT_MANIFEST = "cohort.json"
