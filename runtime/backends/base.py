"""The backend interface: probabilities for a uint8 batch, and LIME batches for one image at a time."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BatchLimits:
    min_batch: int = 1
    max_batch: int = 64


class Backend(ABC):
    """Classifier: ``run(N x 1 x S x S uint8) -> N x classes float32``. Use as a context manager."""

    name: str = ""
    precision: str = ""
    limits: BatchLimits = BatchLimits()

    @abstractmethod
    def run(self, batch: np.ndarray) -> np.ndarray: ...

    def close(self) -> None:  # noqa: B027  (optional hook)
        pass

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run_chunked(self, batch: np.ndarray) -> np.ndarray:
        """Split a batch to fit the backend's limits."""
        step = self.limits.max_batch
        return np.concatenate([self.run(batch[i : i + step]) for i in range(0, len(batch), step)])


class ExplainerBackend(ABC):
    """LIME: ``set_image`` sends image, fill and segment map once; ``run(z)`` sends only on/off rows."""

    name: str = ""
    precision: str = ""
    limits: BatchLimits = BatchLimits()
    bytes_sent: int = 0

    @abstractmethod
    def set_image(self, image: np.ndarray, fill: np.ndarray, segments: np.ndarray) -> None: ...

    @abstractmethod
    def run(self, z: np.ndarray) -> np.ndarray: ...

    def close(self) -> None:  # noqa: B027
        pass

    def __enter__(self) -> ExplainerBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
