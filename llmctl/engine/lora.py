"""LoRA adapters on the builtin engine: each row of a forward pass computed with its own adapter, or none.

Every linear layer of the model gets a forward hook that adds ``scale * B(A(x))`` for the rows whose
adapter adapts it. A forward pass binds its rows' adapters (`LoraSet.rows`); the hook then runs, for all
rows at once, two matrix products against the pass's adapters' factors laid side by side
(``x @ [A_1 .. A_k]`` masked to each row's own columns, then ``@ [B_1; ..; B_k]``): no gathering of
weights per row and no loop over adapters, whatever mix of adapters the batch holds and however many
tokens each row feeds (a decode step, a prefill, several tokens verified at once). Rows without an
adapter get a zero mask; a pass with no adapter at all costs one Python call per layer.

The factors come from the adapter's safetensors file and never touch the base weights, so adapters load
and unload while the engine runs: a pass keeps the adapters it bound, and an adapter is removed only when
the server has no request left that uses it.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from llmctl.core.adapters import AdapterError, AdapterInfo, check_fits
from llmctl.engine.invariant import as_two_rows

log = logging.getLogger(__name__)

_uids = itertools.count(1)
COMBINED_PER_LAYER = 4  # adapter mixes whose side-by-side factors a layer keeps (a batch's mix changes rarely)


@dataclass(eq=False)
class LoadedAdapter:
    """An adapter's factors on the model's device: per layer, A as [in, rank] and scale * B as [rank, out]."""

    info: AdapterInfo
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    uid: int

    @property
    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.factors.values())


@dataclass
class _Pass:
    """One forward pass's rows: the adapters they use and each row's slot (0: none, i: adapters[i - 1])."""

    adapters: tuple[LoadedAdapter, ...]
    row_slots: torch.Tensor  # [B]
    masks: dict

    def mask(self, columns: tuple[tuple[int, int], ...], dtype: torch.dtype) -> torch.Tensor:
        """[B, 1, C]: 1 where a column of the side-by-side factors (``columns``: (slot, rank) per block) belongs
        to the row's adapter."""
        key = (columns, dtype)
        if key not in self.masks:
            slots = torch.cat([torch.full((rank,), slot, device=self.row_slots.device) for slot, rank in columns])
            self.masks[key] = (self.row_slots[:, None] == slots[None, :]).to(dtype)[:, None, :]
        return self.masks[key]


class LoraSet:
    """The adapters resident on a model, and the hooks that apply them per row."""

    def __init__(self, model, max_loras: int, max_rank: int) -> None:
        self.model = model
        self.max_loras = max_loras
        self.max_rank = max_rank
        self.adapters: dict[str, LoadedAdapter] = {}
        embeddings = model.get_input_embeddings().weight
        self.dtype, self.device = embeddings.dtype, embeddings.device
        self.linear: dict[str, torch.nn.Linear] = {}
        output = model.get_output_embeddings()
        for name, module in model.named_modules():
            # bitsandbytes' 8-bit and 4-bit layers are Linear subclasses: adapters sit on them as PEFT's QLoRA does.
            if isinstance(module, torch.nn.Linear) and module is not output:
                self.linear[name] = module
                module.register_forward_hook(self._hook(name))
        self._pass: _Pass | None = None
        self._combined: dict[str, OrderedDict] = {name: OrderedDict() for name in self.linear}
        self._stale = False

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in list(self.adapters.values()))

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        return {name: (m.out_features, m.in_features) for name, m in self.linear.items()}

    def add(self, info: AdapterInfo) -> LoadedAdapter:
        """Load ``info``'s factors (checked against the model first) and make the adapter usable."""
        from safetensors.torch import load_file

        check_fits(info, self.linear_shapes(), "the served model")
        if info.name not in self.adapters and len(self.adapters) >= self.max_loras:
            raise AdapterError(f"LoRA adapter '{info.name}': {self.max_loras} adapters are loaded already "
                               "(--max-loras); unload one first.")
        try:
            tensors = load_file(str(info.weights_file), device="cpu")
        except Exception as exc:  # noqa: BLE001 - a damaged file: one line naming the adapter
            raise AdapterError(f"LoRA adapter '{info.name}' ({info.path}): cannot read its weights: {exc}.") from None
        factors = {}
        for key, tensor in tensors.items():
            if ".lora_A" not in key:
                continue
            module = key.removeprefix("base_model.model.").split(".lora_A")[0]
            a = tensor
            b = tensors[key.replace(".lora_A", ".lora_B")]
            scale = info.modules[module].scale
            # float32 product of the scale, then the serving dtype: the same rounding as PEFT's merge.
            factors[module] = (a.to(torch.float32).t().contiguous().to(self.dtype).to(self.device),
                               (b.to(torch.float32) * scale).t().contiguous().to(self.dtype).to(self.device))
        adapter = LoadedAdapter(info, factors, next(_uids))
        if info.name in self.adapters:
            self._stale = True
        self.adapters[info.name] = adapter
        log.info("LoRA adapter '%s' loaded from %s: rank %d, %d layers, %.1f MB", info.name, info.path, info.rank,
                 len(factors), adapter.nbytes / 1e6)
        return adapter

    def cache_root(self, name: str) -> int:
        """Where the prefix cache's chains of ``name``'s rows start: KV computed with one adapter (one load of
        it) is never read by rows of another."""
        adapter = self.adapters.get(name)
        return hash(("lora", adapter.uid)) if adapter is not None else 0

    def remove(self, name: str) -> None:
        if self.adapters.pop(name, None) is not None:
            self._stale = True  # the engine thread drops the layers' combined factors before its next pass
            log.info("LoRA adapter '%s' unloaded", name)

    @contextlib.contextmanager
    def rows(self, names: list[str | None] | None) -> Iterator[None]:
        """Bind a forward pass's rows to their adapters (None: the base model) while it runs (engine thread)."""
        if self._stale:
            self._stale = False
            for combined in self._combined.values():
                combined.clear()
        active: list[str] = []
        adapters: list[LoadedAdapter] = []
        slots = []
        for name in names or ():
            adapter = self.adapters.get(name) if name else None
            if name is None or adapter is None:  # a base row (or a cancelled one whose adapter is gone)
                slots.append(0)
                continue
            if name not in active:
                active.append(name)
                adapters.append(adapter)
            slots.append(active.index(name) + 1)
        if not adapters:
            yield
            return
        self._pass = _Pass(tuple(adapters), torch.tensor(slots, device=self.device), {})
        try:
            yield
        finally:
            self._pass = None

    def _hook(self, name: str):
        def hook(module, args, output):
            bound = self._pass
            if bound is None:
                return None
            combined = self._factors(name, bound)
            if combined is None:
                return None
            a, b, columns = combined
            x = args[0]
            # One row computed as two, as the layer itself is (llmctl.engine.invariant).
            low = as_two_rows(x.to(a.dtype), lambda rows: rows @ a) * bound.mask(columns, a.dtype)
            return output + as_two_rows(low, lambda rows: rows @ b).to(output.dtype)

        return hook

    def _factors(self, name: str, bound: _Pass) -> tuple[torch.Tensor, torch.Tensor, tuple] | None:
        """The pass's adapters' factors of layer ``name`` side by side (None: none adapts it), kept for a few
        mixes."""
        key = tuple(a.uid for a in bound.adapters)
        cache = self._combined[name]
        found = cache.get(key)
        if found is not None:
            cache.move_to_end(key)
            return found or None
        parts = [(slot, adapter.factors[name]) for slot, adapter in enumerate(bound.adapters, 1)
                 if name in adapter.factors]
        entry: tuple = ()
        if parts:
            a = torch.cat([f[0] for _, f in parts], dim=1) if len(parts) > 1 else parts[0][1][0]
            b = torch.cat([f[1] for _, f in parts], dim=0) if len(parts) > 1 else parts[0][1][1]
            entry = (a, b, tuple((slot, f[0].shape[1]) for slot, f in parts))
        cache[key] = entry
        if len(cache) > COMBINED_PER_LAYER:
            cache.popitem(last=False)
        return entry or None
