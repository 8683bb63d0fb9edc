"""Names of the Flower message records exchanged between the ServerApp and ClientApps.

Plain FedAvg messages (Message API, flwr 1.4x):
- train   server -> client: ARRAYS = global weights, CONFIG = RunConfig + ROUND + EVAL_FIRST
          client -> server: ARRAYS = local weights, METRICS (NUM_EXAMPLES, TRAIN_LOSS, ...),
                            INFO (HOSPITAL)
- evaluate server -> client: ARRAYS, CONFIG; client -> server: METRICS (VAL_*), INFO
EVAL_FIRST asks the client to score the incoming global model on its validation split before
training, which saves one message round trip per round.
"""

ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
INFO = "info"

ROUND = "round"
EVAL_FIRST = "eval-first"
HOSPITAL = "hospital"

NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train-loss"
TRAIN_SECONDS = "train-seconds"
LOAD_SECONDS = "load-seconds"
VAL_DICE = "val-dice"
VAL_LOSS = "val-loss"
NUM_VAL = "num-val-examples"
