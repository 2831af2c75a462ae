"""The weights a simulated server serves, and their in-place update as SGLang
does it (`POST /update_weights_from_disk`, `POST /update_weight_version`;
sglang 0.5.23, entrypoints/http_server.py and the tokenizer manager):

- the update waits for the requests in flight to end, and requests that arrive
  meanwhile wait for it (the tokenizer manager's model-update lock: every
  generation holds it as a reader, an update as the writer);
- on success the server answers under the new path: `model_path` and
  `served_model_name` become it (what /model_info, /server_info and /v1/models
  report), replies follow the new weights, and the prefix cache is flushed
  (the old weights' KV means nothing under the new ones); an optional
  `weight_version` is set too;
- a path without weights fails with the model loader's message and changes
  nothing. The simulator has no weights to read: a path loads when it is the
  launch `--model-path`, one of `--known-model-paths`, or an existing local
  directory.

Replies are a pure function of the weights: the launch path's are the
server's usual ones, another path's differ, and going back gives the first
ones again.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import ServerConfig


def weights_seed(path: str) -> int:
    """What a set of weights (a model's, or a LoRA adapter's) changes in every reply's seed."""
    return int.from_bytes(hashlib.blake2b(path.encode("utf-8"), digest_size=8).digest(), "little")


@dataclass(slots=True)
class ServedWeights:
    launch_path: str
    served_model_name: str
    weight_version: str = "default"
    load_format: str = "auto"
    known_paths: tuple[str, ...] = ()
    model_path: str = ""
    # Set while an update waits for the requests in flight or runs: admissions wait.
    _idle: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.model_path = self.model_path or self.launch_path
        self._idle.set()

    @classmethod
    def launched(cls, config: ServerConfig) -> ServedWeights:
        """The weights the launch flags name."""
        return cls(launch_path=config.model_path, served_model_name=config.served_model_name,
                   weight_version=config.weight_version, known_paths=config.known_model_paths,
                   load_format=str(config.hardware_flags.get("load_format", "auto")))

    @property
    def seed(self) -> int:
        """0 under the launch weights (the server's usual replies)."""
        return 0 if self.model_path == self.launch_path else weights_seed(self.model_path)

    def loadable(self, path: str) -> bool:
        return path == self.launch_path or path in self.known_paths or os.path.isdir(path)

    async def admission(self) -> None:
        """Returns once no update is pending (a new request waits behind one)."""
        while not self._idle.is_set():
            await self._idle.wait()

    def begin_update(self) -> None:
        self._idle.clear()

    def end_update(self) -> None:
        self._idle.set()

    def load(self, path: str, load_format: str | None) -> None:
        self.model_path = self.served_model_name = path
        if load_format:
            self.load_format = load_format
