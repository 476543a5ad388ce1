"""Models an engine serves: moved to the device once, inspected once (layers, hooks, how the forward takes its
cache, sizes), and shared by every session of every client."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import nn

from . import models
from .anatomy import Anatomy, inspect_model
from .decode import ForwardCall
from .errors import InvalidArgumentError
from .hooks import HookDispatcher
from .prefill import DEFAULT_CHUNK, ActivationCost
from .runner import Runner, fuse_layers, unsupported_reason
from .scheduler import Scheduler
from .split import Stage
from .streaming import WeightRing, plan_for, stream_model


def check_text(text: str, what: str) -> None:
    """Refuse text the tokenizer cannot take (a lone surrogate is a valid ``str`` but not valid UTF-8), before it
    reaches the tokenizer, which raises a bare TypeError for it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidArgumentError(f"{what} is not valid text ({exc.reason} at {exc.start})") from None


@dataclass
class LoadedModel:
    id: str
    name: str
    model: nn.Module
    tokenizer: object
    anatomy: Anatomy
    dispatcher: HookDispatcher
    chat: bool
    eos_ids: tuple[int, ...]
    source: str
    device: torch.device
    weight_bytes: int
    kv_bytes_per_token: int
    max_positions: int | None
    forward_call: ForwardCall
    scheduler: Scheduler | None = None  # the fast path's step loop; None when runs take the module path only
    fast_path: str = "off"  # "on", "off", or why the model cannot have it
    ring: WeightRing | None = None  # the streamed layers' ring when the weights exceed the weight budget
    stage: Stage | None = None  # the engine that runs the layers of a model split across engines (split.py)

    def kv_bytes(self, tokens: int, fast: bool) -> int:
        """Device bytes ``tokens`` positions of KV take: whole blocks on the fast path (kv_blocks.py), which is
        what its cache allocates, so a run admitted with this never outgrows its reservation at its last block
        (outgrowing it pages others out from the step loop, holding up every row of the batch)."""
        if fast and self.scheduler is not None:
            shape = self.scheduler.runner.shape
            return shape.block_bytes * shape.blocks_for(tokens)
        return self.kv_bytes_per_token * tokens

    def prefill_bytes(self, new: int, context: int, fast: bool) -> int:
        """Device bytes the activations of a forward feeding ``new`` tokens up to ``context`` take, on the fast
        path or the module path (prefill.py); 0 when the config does not give the model's shape."""
        cost = ActivationCost.of(self.model, self.device, fast)
        return 0 if cost is None else cost.bytes(new, context)

    def words(self, text: str) -> list[int]:
        """The token ids of ``text`` as the tokenizer writes it, no special tokens and no chat template."""
        if self.tokenizer is None:
            raise InvalidArgumentError(f"model {self.name!r} has no tokenizer; pass token ids instead")
        check_text(text, "the text")
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode(self, prompt: str | list[int], chat: bool | None) -> list[int]:
        """A new conversation's tokens: text through the tokenizer (and the chat template when ``chat``, or by
        default for chat models), or token ids checked against the vocabulary."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidArgumentError(f"model {self.name!r} has no tokenizer: pass the prompt as token ids")
            check_text(prompt, "the prompt")
            if chat if chat is not None else self.chat:
                if not getattr(self.tokenizer, "chat_template", None):
                    raise InvalidArgumentError(
                        f"model {self.name!r} has no chat template: pass chat=False and write the prompt yourself"
                    )
                messages = [{"role": "user", "content": prompt}]
                ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
                if isinstance(ids, dict) or hasattr(ids, "keys"):
                    ids = ids["input_ids"]
            else:
                ids = self.tokenizer(prompt)["input_ids"]
        elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            vocab = self.model.get_input_embeddings().num_embeddings
            bad = [t for t in prompt if not 0 <= t < vocab]
            if bad:
                raise InvalidArgumentError(f"token ids {bad[:5]} are outside the vocabulary (0..{vocab - 1})")
            ids = list(prompt)
        else:
            raise InvalidArgumentError(f"a prompt is a string or a list of token ids, not {type(prompt).__name__}")
        if len(ids) == 0:
            raise InvalidArgumentError("the prompt is empty")
        return list(ids)

    def lens(self, h: torch.Tensor) -> torch.Tensor:
        """Next-token logits ``[vocab]`` from one residual-stream vector, through the final norm and the
        unembedding (the logit lens)."""
        row = h.reshape(1, 1, -1)
        if self.anatomy.final_norm_path is not None:
            row = self.model.get_submodule(self.anatomy.final_norm_path)(row)
        return self.model.get_submodule(self.anatomy.unembed_path)(row)[0, -1]

    def decode(self, tokens: list[int]) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.decode(tokens, skip_special_tokens=True)

    def describe(self) -> dict[str, object]:
        config = getattr(self.model, "config", None)
        return {
            "id": self.id,
            "name": self.name,
            "source": self.source,
            "architecture": type(self.model).__name__,
            "num_layers": self.anatomy.num_layers,
            "layer_paths": list(self.anatomy.layer_paths),
            "hidden_size": getattr(config, "hidden_size", None),
            "vocab_size": getattr(config, "vocab_size", None),
            "dtype": str(next(self.model.parameters()).dtype).removeprefix("torch."),
            "device": str(self.device),
            "weight_bytes": self.weight_bytes,
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "chat": self.chat,
            "fast_path": self.fast_path,
            "streaming": None if self.ring is None else self.ring.stats(),
        }


def prepare(
    name: str,
    source: models.ModelSource,
    device: torch.device,
    fast: bool = False,
    weight_budget: int | None = None,
    ring_slots: int = 2,
    prefill_chunk: int = DEFAULT_CHUNK,
) -> LoadedModel:
    """Move a model to ``device`` and learn what serving it needs; its decoder layers get their routing hooks,
    and with ``fast`` (and a Llama-family model) a runner and its scheduler for the batched fast path.

    When its weights exceed ``weight_budget`` device bytes, the layers that do not fit stay in a host arena and
    stream through a ring of ``ring_slots`` device slots (streaming.py); the runner then acquires those layers
    from the ring in its layer loop, so the fast path batches a streamed model's sessions as well.
    ``prefill_chunk``: the most prompt tokens one fast-path step feeds (prefill.py)."""
    forward_call = ForwardCall.of(source.model)
    model = source.model
    anatomy = inspect_model(model)
    total_bytes = weight_bytes(model)
    layers = [model.get_submodule(path) for path in anatomy.layer_paths]
    reason = unsupported_reason(model) if fast else None
    plan = None if weight_budget is None else plan_for(model, layers, weight_budget, ring_slots)
    if plan is not None and fast and reason is None:
        fuse_layers(model)  # before the arena is packed: each slot then holds a layer as the runner reads it
        plan = plan_for(model, layers, weight_budget, ring_slots)
    dispatcher = HookDispatcher(model)
    for path in anatomy.layer_paths:
        dispatcher.ensure(path)  # before the ring's hooks: a pause at a layer's input or output holds no slot
    ring = None
    if plan is None:
        model = model.to(device)
    else:
        ring = stream_model(model, anatomy.layer_paths, plan, device)
    scheduler, fast_path = None, "off"
    if fast:
        if reason is None:
            try:
                scheduler, fast_path = Scheduler(Runner(model, ring=ring), name, prefill_chunk), "on"
            except Exception as exc:  # noqa: BLE001 - e.g. no Triton on this CUDA machine: the module path serves
                fast_path = f"unavailable: {type(exc).__name__}: {exc}"
        else:
            fast_path = f"unavailable: {reason}"
    return LoadedModel(
        id=name,
        name=name,
        model=model,
        tokenizer=source.tokenizer,
        anatomy=anatomy,
        dispatcher=dispatcher,
        chat=source.chat,
        eos_ids=source.eos_ids,
        source=source.source,
        device=device,
        weight_bytes=total_bytes,
        kv_bytes_per_token=kv_bytes_per_token(model),
        max_positions=_context_limit(model),
        forward_call=forward_call,
        scheduler=scheduler,
        fast_path=fast_path,
        ring=ring,
    )


def kv_bytes_per_token(model: nn.Module) -> int:
    """Bytes of K and V one token adds to the cache, from the config (0 when the config does not say)."""
    config = getattr(model, "config", None)
    layers = getattr(config, "num_hidden_layers", None)
    heads = getattr(config, "num_attention_heads", None)
    if not layers or not heads:
        return 0
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    itemsize = next(model.parameters()).element_size()
    return 2 * layers * kv_heads * head_dim * itemsize


def _context_limit(model: nn.Module) -> int | None:
    """How many positions a run may span: the learned position table's size (GPT-2 style), else the context the
    config declares (``max_position_embeddings``), else None.

    Past a learned table the embedding lookup reads out of bounds: a device-side assert on CUDA, which would
    poison the daemon's CUDA context for every session. A rotary model would run on past its declared context,
    but into positions it was not trained for, holding memory for as long as it runs: one such request must not
    be able to take a shared daemon's memory (issue 13).
    """
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) and name.rsplit(".", 1)[-1] in ("wpe", "position_embeddings"):
            return module.num_embeddings
    declared = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return declared if isinstance(declared, int) and declared > 0 else None


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every distinct parameter and buffer storage (tied weights once)."""
    storages = {}
    for t in itertools.chain(model.parameters(), model.buffers()):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())
