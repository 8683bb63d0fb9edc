"""`ours` in `fedmri bench secagg`: the client masks its benchmark vector with our secure
aggregation (fedmri.client.secure_client), measured like the other variants. The unmask step
also answers the next round's advertise when the server sends its setup along."""

from __future__ import annotations

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedmri.client import secure_client
from fedmri.client.bench_apps import cohort_client, measured
from fedmri.common import wire

secure_app = ClientApp()


@secure_app.train()
def _secure_train(msg: Message, context: Context) -> Message:
    with measured(context, "ours"):
        index, cohort = cohort_client(context)
        hospital = str(context.node_config[wire.HOSPITAL])
        reply = RecordDict({wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: cohort.weight(index)})})
        records = secure_client.mask(msg, context, hospital, cohort.vector(index),
                                     cohort.weight(index))
        for name, record in records.items():
            reply[name] = record
        return Message(reply, reply_to=msg)


@secure_app.query()
def _secure_step(msg: Message, context: Context) -> Message:
    with measured(context, "ours"):
        hospital = str(context.node_config[wire.HOSPITAL])
        if secure_client.stage_of(msg) == wire.STAGE_ADVERTISE:
            return secure_client.advertise(msg, context, hospital)
        return secure_client.unmask(msg, context, hospital)
