"""The hospital's long-lived ClientApp executor: only approved code runs, and it stays warm.

`fedmri client start` runs Flower's SuperNode in process-isolation mode: the SuperNode queues
one task per message and waits for an executor to take it from its Runtime API (127.0.0.1,
tasks claimed with a shared secret). Flower's own executor starts a fresh `flwr-clientapp`
per message, which installs the run's app bundle (FAB), puts it first on `sys.path` and
imports the component it names: the coordinator's code. This executor instead

- imports fedmri's ClientApp once, from the installed package, and calls it in-process for
  every message, so torch stays imported and the hospital's volumes stay decoded in memory
  (fedmri.client.hospital_data keeps the last split);
- never installs or imports anything from a bundle: a run whose bundle names another
  ClientApp, or carries a file with code, is refused: the reply is an error whose reason
  reaches the coordinator, and the refusal is logged;
- always answers a task it took (an error if need be) and heartbeats while the app works, so
  the SuperNode never waits on it.

Flower's Runtime API client and its pull/push helpers are internal to flwr; flwr is pinned
(pyproject) and tests/test_daemon_e2e.py exercises this path end to end.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import hashlib
import io
import logging
import sys
import threading
import time
import tomllib
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("fedmri.executor")

APPROVED_CLIENTAPP = "fedmri.client.app:app"
MAX_BUNDLE_BYTES = 1 << 20  # fedmri's bundles are a few KB; bigger ones are not ours
HEARTBEAT_S = 15.0  # Flower fails a task after 60 s without one
IDLE_POLL_S = 0.2


def supernode_args(secret_file: Path) -> list[str]:
    """What a SuperNode needs so that only this executor, holding the secret, takes its
    tasks (its task API stays on 127.0.0.1: --host, the default)."""
    return ["--isolation", "process", "--superexec-auth-secret-file", str(secret_file)]


def executor_argv(runtime_port: int, secret_file: Path) -> list[str]:
    return [sys.executable, "-m", "fedmri.client.executor", "--runtime",
            f"127.0.0.1:{runtime_port}", "--secret-file", str(secret_file)]


def bundle_problem(content: bytes, fab_hash: str, run_fab_hash: str) -> str | None:
    """Why this app bundle must not run here, or None. Accepted: a pyproject naming
    APPROVED_CLIENTAPP, Flower's .info/ manifest, and Python files without code (docstrings,
    `app = None`, as Flower's packaging needs)."""
    if len(content) > MAX_BUNDLE_BYTES:
        return f"the app bundle is {len(content)} bytes; fedmri's are a few KB"
    digest = hashlib.sha256(content).hexdigest()
    if digest != fab_hash or digest != run_fab_hash:
        return "the app bundle does not match its announced hash"
    try:
        with zipfile.ZipFile(io.BytesIO(content)) as bundle:
            entries = bundle.infolist()
            names = [e.filename for e in entries]
            if sum(e.file_size for e in entries) > MAX_BUNDLE_BYTES:
                return "the app bundle unpacks to more than 1 MB; fedmri's are a few KB"
            if len(set(names)) != len(names):
                return "the app bundle holds a file twice"
            config = tomllib.loads(bundle.read("pyproject.toml").decode())
            sources = {n: bundle.read(n) for n in names if n.endswith(".py")}
    except (zipfile.BadZipFile, KeyError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        return f"the app bundle is unreadable: {err}"
    try:
        clientapp = config["tool"]["flwr"]["app"]["components"]["clientapp"]
    except (KeyError, TypeError):
        return "the app bundle names no ClientApp"
    if clientapp != APPROVED_CLIENTAPP:
        return (f"the app bundle names the ClientApp {clientapp!r}; this hospital runs only "
                f"the installed {APPROVED_CLIENTAPP}")
    for name in names:
        if name in ("pyproject.toml", ".info/CONTENT"):
            continue
        if "/" in name or "\\" in name or name.startswith(".") or name not in sources \
                or not _code_free(sources[name]):
            return (f"the app bundle carries code ({name}); this hospital runs only the "
                    "installed fedmri")
    return None


def _code_free(source: bytes) -> bool:
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError, MemoryError, RecursionError):  # hostile nesting
        return False
    for node in tree.body:
        docstring = isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) \
            and isinstance(node.value.value, str)
        app_none = isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) \
            and node.value.value is None
        if not (docstring or app_none):
            return False
    return True


def _pull_task(client: Any) -> tuple[Any, Any, Any, Any]:
    """The task's message, context, run and bundle. As flwr's pull_task_input, but polling
    for the message's objects every 50 ms up to 0.5 s: the SuperNode queues a task before it
    holds all of the message, and Flower's own back-off (1 s doubling to 10 s, made for a
    process that takes seconds to start) would add about 7 s to a message taken at once."""
    from flwr.app import Message
    from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
    from flwr.proto.node_pb2 import Node
    from flwr.proto.runtime_pb2 import PullAppMessagesRequest, PullTaskInputRequest
    from flwr.supercore.inflatable.inflatable_protobuf_utils import (
        make_confirm_message_received_fn_protobuf,
        make_pull_object_fn_protobuf,
    )
    from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
    from flwr.supercore.task_identity import TaskIdentity

    task = client.PullTaskInput(PullTaskInputRequest())
    context, run, fab = (context_from_proto(task.context), run_from_proto(task.run),
                         fab_from_proto(task.fab))
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = (
        task.task_id, task.run.run_id, task.context.node_id)
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("the SuperNode handed a task without a message")
    tree = pulled.message_object_trees[0]
    node = Node(node_id=context.node_id)
    message = pull_and_inflate_object_from_tree(
        tree, make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node,
                                                  context.run_id),
        return_type=Message, initial_backoff=0.05, backoff_cap=0.5)
    message.metadata.__dict__["_message_id"] = tree.object_id  # not part of its content
    return message, context, run, fab


class _Heartbeat(threading.Thread):
    """Keeps a task alive while the app works; a refused heartbeat only stops it (Flower's
    own sender would interrupt the whole process)."""

    def __init__(self, client: Any) -> None:
        super().__init__(daemon=True)
        self.client, self.stopped = client, threading.Event()

    def run(self) -> None:
        from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest

        while not self.stopped.is_set():
            try:
                if not self.client.SendTaskHeartbeat(SendTaskHeartbeatRequest()).success:
                    return
            except Exception:  # transport errors: the SuperNode will fail the task itself
                return
            self.stopped.wait(HEARTBEAT_S)


class Executor:
    def __init__(self, runtime: str, secret: bytes,
                 app: Callable[..., Any] | None = None) -> None:
        from flwr.proto.runtime_pb2 import AcquireTaskRequest
        from flwr.supercore.constant import TaskType
        from flwr.supercore.interceptors import (
            RuntimeVersionHttpInterceptor,
            SuperExecAuthHttpInterceptor,
        )
        from flwr.supercore.runtime import RuntimeHttpClient

        self.runtime = runtime
        self._acquire_request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
        self._claims = RuntimeHttpClient.from_server_address(
            runtime, True, None, [
                RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                SuperExecAuthHttpInterceptor(master_secret=secret, protected_methods={
                    "/flwr.proto.Runtime/AcquireTask"})])
        if app is None:
            import fedmri.client.trainer  # noqa: F401  torch and MONAI, once, before any task
            from fedmri.client.app import app as installed

            app = installed
        self.app = app
        self.tasks = 0

    def poll_once(self) -> bool:
        """Take and answer one task if there is one; whether there was."""
        try:
            res = self._claims.AcquireTask(self._acquire_request)
        except Exception as err:  # the SuperNode restarting: keep polling
            log.debug("event=acquire_failed error=%r", str(err))
            return False
        if not res.HasField("task") or not res.token:
            return False
        self._serve(res.token, res.task.run_id)
        return True

    def _serve(self, token: str, run_id: int) -> None:
        from flwr.app import Error, Message
        from flwr.common.constant import ErrorCode, SubStatus
        from flwr.supercore.interceptors import (
            RuntimeTokenHttpInterceptor,
            RuntimeVersionHttpInterceptor,
        )
        from flwr.supercore.runtime import RuntimeHttpClient
        from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

        client = RuntimeHttpClient.from_server_address(self.runtime, True, None, [
            RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
            RuntimeTokenHttpInterceptor(token)])
        beat = _Heartbeat(client)
        beat.start()
        started = time.perf_counter()
        context, status, details, kind = None, SubStatus.FAILED, "executor failed", "?"
        pulled = called = started
        try:
            message, context, run, fab = _pull_task(client)
            pulled = time.perf_counter()
            kind = message.metadata.message_type
            problem = bundle_problem(fab.content, fab.hash_str, run.fab_hash)
            if problem:
                log.warning("event=run_refused run=%d fab=%s reason=%r", run_id,
                            fab.hash_str[:12], problem)
                reply = Message(Error(code=ErrorCode.LOAD_CLIENT_APP_EXCEPTION,
                                      reason=f"refused by the hospital: {problem}"),
                                reply_to=message)
                details = problem
            else:
                try:
                    reply = self.app(message=message, context=context)
                    status, details = SubStatus.COMPLETED, ""
                except Exception as err:
                    details = f"{type(err)}:<'{err}'>"  # Flower's format, parsed upstream
                    log.warning("event=clientapp_error run=%d type=%s error=%r", run_id, kind,
                                str(err)[:500])
                    reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                                          reason=details), reply_to=message)
            called = time.perf_counter()
            push_message(client, reply, context)
        except Exception as err:  # transport: the SuperNode fails the task after its TTL
            log.warning("event=task_failed run=%d error=%r", run_id, str(err)[:500])
        finally:
            beat.stopped.set()
            try:
                push_task_output(client, context, status, details)
            finally:
                client.close()
        self.tasks += 1
        done = time.perf_counter()
        log.info("event=task_done run=%d type=%s status=%s seconds=%.2f pull=%.2f app=%.2f "
                 "push=%.2f", run_id, kind, status, done - started, pulled - started,
                 called - pulled, done - called)

    def serve_forever(self) -> None:
        while True:
            if not self.poll_once():
                time.sleep(IDLE_POLL_S)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedmri.client.executor",
                                     description="fedmri's long-lived ClientApp executor.")
    parser.add_argument("--runtime", required=True, help="the SuperNode's Runtime API")
    parser.add_argument("--secret-file", type=Path, required=True,
                        help="the SuperNode's --superexec-auth-secret-file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per poll otherwise
    started = time.perf_counter()
    executor = Executor(args.runtime, args.secret_file.read_bytes())
    log.info("event=executor_ready runtime=%s import_seconds=%.2f", args.runtime,
             time.perf_counter() - started)
    with contextlib.suppress(KeyboardInterrupt):
        executor.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
