"""Names of the Flower message records exchanged between the ServerApp and the ClientApps.

Plain FedAvg messages (Message API, flwr 1.4x):
- train   server -> client: ARRAYS + WEIGHTS_INDEX = global weights (fedmri.proto.weights),
                            CONFIG = RunConfig + ROUND + EVAL_FIRST
          client -> server: ARRAYS + WEIGHTS_INDEX = local weights, METRICS (NUM_EXAMPLES,
                            TRAIN_LOSS, ...), INFO (INFO_HOSPITAL)
- evaluate server -> client: ARRAYS + WEIGHTS_INDEX, CONFIG; client -> server: METRICS
                            (VAL_*), INFO
EVAL_FIRST asks the client to score the incoming global model on its validation split before
training, which saves one message round trip per round. INFO_HOSPITAL is the field of a
reply that names the sending hospital; the SuperNode's own config key for its name is
`fedmri.proto.node_config.NodeConfig.hospital`.
"""

ARRAYS = "arrays"
WEIGHTS_INDEX = "weights-index"
CONFIG = "config"
METRICS = "metrics"
INFO = "info"

ROUND = "round"
EVAL_FIRST = "eval-first"
INFO_HOSPITAL = "hospital"

NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train-loss"
TRAIN_SECONDS = "train-seconds"
LOAD_SECONDS = "load-seconds"
MESH_SETUP_SECONDS = "mesh-setup-seconds"  # starting tp x dp workers and their group
VAL_DICE = "val-dice"
VAL_LOSS = "val-loss"
NUM_VAL = "num-val-examples"

# Secure aggregation (fedmri.common.secagg carried in Flower messages, see
# fedmri.server.secure_round): a ConfigRecord SECAGG with SECAGG_STAGE and the stage's
# serialized protocol message; the masked vector travels as a uint32 array in an ArrayRecord.
#   query advertise   server: STAGE_ADVERTISE, SETUP           client: ADVERT
#   train mask        server: STAGE_MASK, KEYS, CLIP, SCALE,    client: SHARES, VOTE, and
#                     MAX_WEIGHT (+ ARRAYS, CONFIG)                     MASKED (+ METRICS, INFO)
#   query consistency server: STAGE_CONSISTENCY, CHECK         client: VOTE
#   query unmask      server: STAGE_UNMASK, REQUEST [, SETUP]   client: REVEAL [, ADVERT]
# The consistency query is sent only when a hospital that got keys dropped before its masked
# reply (else the votes of the mask replies already sign the survivor set). An unmask request
# carries the next round's SETUP unless it is the run's last round; the reply then carries the
# hospital's ADVERT for that round, which therefore skips the advertise query.
SECAGG = "secagg"
SECAGG_STAGE = "stage"
STAGE_ADVERTISE = "advertise"
STAGE_MASK = "mask"
STAGE_UNMASK = "unmask"
STAGE_CONSISTENCY = "consistency"
SECAGG_SETUP = "setup"
SECAGG_ADVERT = "advertise"
SECAGG_KEYS = "keys"
SECAGG_CLIP = "clip"
SECAGG_SCALE = "scale"
SECAGG_MAX_WEIGHT = "max-weight"
SECAGG_SHARES = "shares"
SECAGG_MASKED = "masked"
SECAGG_REQUEST = "request"
SECAGG_REVEAL = "reveal"
SECAGG_VOTE = "vote"
SECAGG_CHECK = "check"
