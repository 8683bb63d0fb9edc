"""`fake_hospital.Hospitals` as a real Flower ClientApp (component `fake_hospital_app:app`;
tests put this folder on the SuperNodes' PYTHONPATH)."""

from __future__ import annotations

from fake_hospital import Hospitals
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

app = ClientApp()
_HOSPITAL = Hospitals()


@app.train()
def _train(msg: Message, context: Context) -> Message:
    return _HOSPITAL(msg, context)


@app.query()
def _query(msg: Message, context: Context) -> Message:
    return _HOSPITAL(msg, context)


@app.evaluate()
def _evaluate(msg: Message, context: Context) -> Message:
    return _HOSPITAL(msg, context)
