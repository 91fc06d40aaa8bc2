"""Harli's Python client: streaming inference and job control over ZeroMQ.

``InferenceClient`` / ``AsyncInferenceClient`` send generation requests to the daemon's
inference endpoint; ``ControlClient`` attaches and manages finetune jobs and reads the daemon's
status. The client speaks only the wire types of ``harli.ipc`` (``docs/protocol.md``).
"""

from harli.client.control import ControlClient
from harli.client.inference import (
    AsyncInferenceClient,
    Completion,
    CurveKeys,
    InferenceClient,
    RequestError,
)

__all__ = ["AsyncInferenceClient", "Completion", "ControlClient", "CurveKeys", "InferenceClient",
           "RequestError"]
