"""The engine's models: each loaded once and shared by every session, models built in code, and the two halves of a
model split by layer across engines (split.py). The engine's methods for these (``Engine`` inherits
``ModelCatalog``), kept apart from sessions, runs and paging; what preparing one model means is registry.py's.

A ``ModelCatalog`` needs ``_models``, ``_lock``, ``_load_lock``, ``_progress``, ``memory`` and the engine's
model settings (``device``, ``fast``, ``weight_memory``, ``ring_slots``, ``prefill_chunk``) from the class it is
mixed into. Lock order as in engine.py: ``_load_lock`` before ``_lock``.
"""

from __future__ import annotations

from dataclasses import replace

from torch import nn

from . import models, split
from .errors import InvalidArgumentError, ModelNotFoundError
from .memory import GiB
from .registry import LoadedModel, prepare


class ModelCatalog:
    """The model operations of the engine (see the module docstring)."""

    def load_model(self, name: str, dtype: str = "auto") -> dict[str, object]:
        """Load ``name`` once; later calls (from any client) return the same model at once."""
        wanted = models.parse_dtype(dtype)
        with self._load_lock:
            if isinstance(name, str) and name in self._models:  # resolve() says what else a name may not be
                loaded = self._models[name]
                have = next(loaded.model.parameters()).dtype
                if wanted != "auto" and wanted != have:
                    raise InvalidArgumentError(
                        f"{name} is already loaded in {str(have).removeprefix('torch.')} and shared by every "
                        f"session; load it with dtype='auto' (or that dtype)"
                    )
                return loaded.describe()
            source = models.resolve(name, dtype=wanted, progress=self._progress)
            return self._register(name, source)

    def register_model(
        self, name: str, model: nn.Module, tokenizer: object = None, eos_ids: tuple[int, ...] = ()
    ) -> dict[str, object]:
        """Serve a model built in code (e.g. a seeded random model of a real shape, created on the GPU).

        Without a tokenizer, prompts must be token-id lists and runs report no text.
        """
        return self._register_new(name, models.ModelSource(model.eval(), tokenizer, False, tuple(eos_ids), "in code"))

    def register_split(
        self, name: str, model: nn.Module, remote: range, stage: split.Stage, tokenizer: object = None,
        eos_ids: tuple[int, ...] = (),
    ) -> dict[str, object]:
        """Serve ``model`` with its decoder layers in ``remote`` run by ``stage``, another engine that serves
        them (``register_stage`` there): sessions live here, and those layers' weights and KV live there
        (split.py). Runs take the module path."""
        split.cut_for_host(model, remote)
        source = models.ModelSource(model.eval(), tokenizer, False, tuple(eos_ids), "in code, split")
        return self._register_new(name, source, stage=stage)

    def register_stage(self, name: str, model: nn.Module, served: range) -> dict[str, object]:
        """Serve the decoder layers in ``served`` of ``model`` for a split model's host (``register_split`` on
        the engine that holds its sessions); the other layers' weights are dropped here."""
        split.cut_for_stage(model, served)
        return self._register_new(name, models.ModelSource(model.eval(), None, False, (), "in code, stage"), fast=False)

    def serve_split(self, name: str, split_at: int, stage: split.Stage, dtype: str = "auto") -> dict[str, object]:
        """Load ``name`` as the host of a split: its first ``split_at`` decoder layers run on ``stage``, which
        serves them (``serve_stage`` there, same arguments). Its id is ``split.host_id(name, split_at)``."""
        return self._serve_part(name, split_at, dtype, stage)

    def serve_stage(self, name: str, split_at: int, dtype: str = "auto") -> dict[str, object]:
        """Load the first ``split_at`` decoder layers of ``name`` for a split's host (``serve_split``); its id is
        ``split.stage_id(name, split_at)``."""
        return self._serve_part(name, split_at, dtype, None)

    def _serve_part(self, name: str, split_at: int, dtype: str, stage: split.Stage | None) -> dict[str, object]:
        """One side of a split of ``name``, loaded by name: the host when ``stage`` is given, else the stage."""
        model_id = split.stage_id(name, split_at) if stage is None else split.host_id(name, split_at)
        with self._lock:
            if model_id in self._models:
                return self._models[model_id].describe()
        source = models.resolve(name, dtype=models.parse_dtype(dtype), progress=self._progress)
        layers = range(0, split.check_at(source.model, split_at))
        if stage is None:
            split.cut_for_stage(source.model, layers)
        else:
            split.cut_for_host(source.model, layers)
        role = "stage" if stage is None else "split"
        return self._register_new(model_id, replace(source, source=f"{source.source}, {role}"), fast=False, stage=stage)

    def _register_new(
        self, name: str, source: models.ModelSource, fast: bool | None = None, stage: split.Stage | None = None
    ) -> dict[str, object]:
        """Serve ``source`` as ``name``, which must be new; a split's host or stage takes the module path."""
        with self._load_lock:
            if name in self._models:
                raise InvalidArgumentError(f"a model named {name!r} is already loaded; pick another name")
            return self._register(name, source, fast=False if stage is not None else fast, stage=stage)

    def _register(
        self, name: str, source: models.ModelSource, fast: bool | None = None, stage: split.Stage | None = None
    ) -> dict[str, object]:
        loaded = prepare(
            name, source, self.device, fast=self.fast if fast is None else fast, weight_budget=self.weight_memory,
            ring_slots=self.ring_slots, prefill_chunk=self.prefill_chunk,
        )
        loaded.stage = stage
        if loaded.ring is not None and self._progress is not None:
            plan = loaded.ring.plan
            self._progress(
                f"djinn: {name} streams {len(plan.streamed)} of {loaded.anatomy.num_layers} decoder layers from host "
                f"memory through {plan.slots} ring slots ({plan.device_bytes / GiB:.2f} GiB of weights on the device)"
            )
        if loaded.scheduler is not None and self.device.type == "cuda":
            if self._progress is not None:
                self._progress(f"djinn: compiling and capturing {name}'s decode step for batch sizes 1-64 (once)…")
            loaded.scheduler.runner.warm_up()
        self.memory.weights_loaded(loaded.weight_bytes if loaded.ring is None else loaded.ring.plan.device_bytes)
        with self._lock:
            self._models[name] = loaded
        return loaded.describe()

    def _model(self, model_id: str) -> LoadedModel:
        with self._lock:
            loaded = self._models.get(model_id)
        if loaded is None:
            raise ModelNotFoundError(f"model {model_id!r} is not loaded; load it first (djinn_kernel.load({model_id!r}))")
        return loaded

    def module_paths(self, model_id: str) -> list[str]:
        return [name for name, _ in self._model(model_id).model.named_modules() if name]

    def token_strings(self, model_id: str, token_ids: list[int]) -> list[str]:
        """Each token id decoded on its own: labels for heatmap rows and token tables."""
        loaded = self._model(model_id)
        if not isinstance(token_ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in token_ids):
            raise InvalidArgumentError("token_ids must be a list of integers")
        vocab = loaded.model.get_input_embeddings().num_embeddings
        bad = [t for t in token_ids if not 0 <= t < vocab]
        if bad:
            raise InvalidArgumentError(f"token ids {bad[:5]} are outside the vocabulary (0..{vocab - 1})")
        if loaded.tokenizer is None:
            return [f"#{t}" for t in token_ids]
        return [loaded.tokenizer.decode([t]) for t in token_ids]

    def tokenize(self, model_id: str, text: str) -> list[int]:
        """The token ids of ``text`` as the model's tokenizer writes it, no special tokens and no chat template:
        what patching and other position-wise comparisons take."""
        loaded = self._model(model_id)
        if not isinstance(text, str):
            raise InvalidArgumentError(f"text must be a string, not {type(text).__name__}")
        return loaded.words(text)

    def models(self) -> list[dict[str, object]]:
        with self._lock:
            return [m.describe() for m in self._models.values()]
