"""A classifier backend that sends preprocessed uint8 batches to ``cxr-run serve`` (or any Triton serving it).

The client preprocesses with the same reader as local predict, so records and per-file errors match;
every network or server failure is a one-line ``CxrError`` that the caller records per file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import numpy as np
from cxr.runtime.backends.base import FEATURES, IMAGE, PROBS, Backend, BatchLimits
from cxr.runtime.card import Card
from cxr.runtime.errors import CxrError, CxrUsageError
from cxr.runtime.optional import install_hint, require

SCHEMES = ("http", "grpc")
CONSECUTIVE_FAILURES_TO_GIVE_UP = 3
SERVER_NAME = "request image"  # how the server names an encoded image in its errors


@dataclass(frozen=True)
class RemoteImage:
    """One encoded image as the server read it: probabilities, or the error; the warnings either way."""

    probs: np.ndarray | None
    warnings: tuple[str, ...] = ()
    error: str | None = None
    ood_score: float | None = None  # the server's gate (None: its bundle has none)


def parse_server_url(url: str) -> tuple[str, str]:
    """``http://host:port``, ``grpc://host:port`` or ``host:port`` (HTTP) -> (scheme, host:port)."""
    parsed = urlparse(url if "://" in url else f"http://{url}")
    if parsed.scheme not in SCHEMES or not parsed.hostname or parsed.path not in ("", "/"):
        raise CxrUsageError(f"--server must look like http://HOST:PORT or grpc://HOST:PORT, got {url!r}")
    try:
        port = parsed.port or (8001 if parsed.scheme == "grpc" else 8000)
    except ValueError:
        raise CxrUsageError(f"--server {url!r}: the port is not a number from 1 to 65535") from None
    return parsed.scheme, f"{parsed.hostname}:{port}"


def _reason(exc: BaseException) -> str:
    message = getattr(exc, "message", None)
    text = message() if callable(message) else str(exc)
    text = " ".join((text or "").split())
    return (text or type(exc).__name__)[:300]  # some socket timeouts carry no message


def model_mismatch(local: Card, served: dict[str, Any]) -> str | None:
    """Why the server's model is not the local bundle's (None when the fp32 graph, classes and input agree).

    The fp32 graph's hash names the trained model; engines or fp16 graphs added later do not change it.
    """
    card = served.get("card", {})
    ours = json.loads(json.dumps(local.to_dict()))  # tuples -> lists, as the server's JSON has them
    checks = {
        "model.onnx sha256": (
            ours.get("files", {}).get("model.onnx"),
            card.get("files", {}).get("model.onnx"),
        ),
        "classes": (ours.get("classes"), card.get("classes")),
        "input": (ours.get("input"), card.get("input")),
        "preprocessing": (ours.get("preprocessing"), card.get("preprocessing")),
    }
    differ = [name for name, (mine, theirs) in checks.items() if mine != theirs]
    return f"{', '.join(differ)} differ" if differ else None


class TritonClientBackend(Backend):
    """``run(N x 1 x S x S uint8)`` over KServe v2 (HTTP or gRPC) against the NAME model of a cxr server."""

    def __init__(self, url: str, model_name: str = "cxr", timeout_s: float = 30.0) -> None:
        if timeout_s <= 0:
            raise CxrUsageError("--timeout must be more than 0 seconds")
        self.url, self.model_name, self.timeout_s = url, model_name, timeout_s
        self.scheme, self.address = parse_server_url(url)
        self.failures, self.last_error = 0, ""
        self._client: Any = None
        self._module: Any = None
        self.unreachable = ""  # why the card query failed (a down server is not fatal: each image then fails)
        try:
            info = self._query_card()
        except CxrError as exc:
            self.unreachable, info = str(exc), {}
        self.served: dict[str, Any] | None = info or None
        self.name = f"triton:{info.get('backend', '?')}" if info else "triton"
        self.precision = info.get("precision", "")
        self.limits = BatchLimits(1, max(1, int(info.get("max_batch", 64))))

    def _connect(self) -> tuple[Any, Any]:
        if self._client is None:
            try:
                if self.scheme == "grpc":
                    import tritonclient.grpc as module

                    self._client = module.InferenceServerClient(self.address)
                else:
                    module = require("tritonclient.http", "--server")
                    self._client = module.InferenceServerClient(
                        self.address, connection_timeout=self.timeout_s, network_timeout=self.timeout_s
                    )
            except ImportError:
                raise CxrError(f"--server needs tritonclient: {install_hint('tritonclient')}") from None
            self._module = module
        return self._client, self._module

    def _infer(self, model: str, name: str, data: np.ndarray, datatype: str, output: str) -> np.ndarray:
        return self._call(model, {name: (data, datatype)}, [output])[output]

    def _call(
        self, model: str, inputs: dict[str, tuple[np.ndarray, str]], outputs: list[str]
    ) -> dict[str, np.ndarray]:
        """One inference request; every failure is this request's one-line ``CxrError``."""
        if self.failures >= CONSECUTIVE_FAILURES_TO_GIVE_UP:
            raise CxrError(
                f"server {self.url}: gave up after {self.failures} failed requests in a row "
                f"({self.last_error})"
            )
        try:
            client, module = self._connect()
            requests = []
            for name, (data, datatype) in inputs.items():
                requests.append(module.InferInput(name, list(data.shape), datatype))
                requests[-1].set_data_from_numpy(data)
            extra = {"client_timeout": self.timeout_s} if self.scheme == "grpc" else {}
            asked = [module.InferRequestedOutput(output) for output in outputs]
            result = client.infer(model, requests, outputs=asked, **extra)
            values = {output: result.as_numpy(output) for output in outputs}
        except CxrError:
            raise
        except Exception as exc:  # socket, gevent, grpc and Triton errors all mean "this request failed"
            self.failures += 1
            self.last_error = _reason(exc)
            self.close()  # a fresh connection for the next try
            raise CxrError(f"server {self.url}: {self.last_error}") from None
        self.failures = 0
        missing = [output for output, value in values.items() if value is None]
        if missing:
            raise CxrError(f"server {self.url}: reply has no {missing[0]!r} output")
        return values

    def server_card(self) -> dict[str, Any]:
        """The card and backend the server runs, as asked when this client was opened."""
        if self.served is None:
            raise CxrError(self.unreachable)
        return self.served

    def _query_card(self) -> dict[str, Any]:
        """Ask the NAME_card model which card and backend the server runs."""
        reply = self._infer(
            f"{self.model_name}_card", "query", np.array([[b"card"]], dtype=object), "BYTES", "card"
        )
        try:
            info = json.loads(bytes(reply.reshape(-1)[0]))
        except (ValueError, TypeError):
            raise CxrError(f"server {self.url}: {self.model_name}_card did not reply with JSON") from None
        if not isinstance(info, dict):
            raise CxrError(f"server {self.url}: {self.model_name}_card did not reply with a JSON object")
        return info

    @property
    def features_width(self) -> int | None:
        width = (self.served or {}).get("features")
        return int(width) if isinstance(width, int) and width > 0 else None

    def _run(self, batch: np.ndarray) -> np.ndarray:
        return self._run_outputs(batch)[0]

    def _run_outputs(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Probabilities and, where the server's graph emits them, the gate's features (this client scores
        them with its own copy of the bundle's gate)."""
        outputs = [PROBS] + [FEATURES] * bool(self.features_width)
        pixels = np.ascontiguousarray(batch, dtype=np.uint8)
        reply = self._call(self.model_name, {IMAGE: (pixels, "UINT8")}, outputs)
        probs = reply[PROBS]
        if probs.shape[0] != batch.shape[0]:
            raise CxrError(f"server {self.url}: {probs.shape[0]} results for {batch.shape[0]} images")
        features = reply.get(FEATURES)
        return probs.astype(np.float32), None if features is None else features.astype(np.float32)

    def run_encoded(self, sources: list[bytes], names: list[str], strict: bool = False) -> list[RemoteImage]:
        """Encoded files read, prepared and classified by the server (``NAME_encoded``), with the warnings
        and errors local predict gives them; ``names`` replace the server's name for an image in its errors,
        so the records read as local ones. ``strict``: a warning fails the image, as ``--strict`` does. Sent
        in requests of at most the server's batch."""
        step = self.limits.max_batch
        return [
            image
            for start in range(0, len(sources), step)
            for image in self._encoded(sources[start : start + step], names[start : start + step], strict)
        ]

    def _encoded(self, sources: list[bytes], names: list[str], strict: bool) -> list[RemoteImage]:
        count = len(sources)
        data = np.array([[bytes(source)] for source in sources], dtype=object)
        inputs = {"data": (data, "BYTES"), "strict": (np.full((count, 1), strict, dtype=bool), "BOOL")}
        reply = self._call(f"{self.model_name}_encoded", inputs, ["probs", "error", "warnings", "ood_score"])
        if any(len(values) != count for values in reply.values()):
            raise CxrError(f"server {self.url}: a reply that does not hold {count} images")
        return [_remote_image(reply, i, name) for i, name in enumerate(names)]

    def close(self) -> None:
        if self._client is not None:
            try:
                self._client.close()
            except Exception:
                pass
            self._client = None


def _remote_image(reply: dict[str, np.ndarray], index: int, name: str) -> RemoteImage:
    error = bytes(reply["error"].reshape(-1)[index]).decode("utf-8", "replace")
    try:
        warnings = tuple(str(w) for w in json.loads(bytes(reply["warnings"].reshape(-1)[index])))
    except (ValueError, TypeError):
        warnings = ()
    score = float(reply["ood_score"].reshape(-1)[index])
    score = None if not np.isfinite(score) else score
    if error:
        if error.startswith(SERVER_NAME):
            error = name + error[len(SERVER_NAME) :]
        return RemoteImage(None, warnings, error, score)
    return RemoteImage(reply["probs"][index].astype(np.float32), warnings, None, score)
