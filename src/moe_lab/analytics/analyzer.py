"""RouterAnalyzer: which experts see which tokens, how routing relates to labels, how it changes.

Shape legend: B batch, S sequence, K slots per token, E experts, L labels.

Data items (for every method taking ``data``) may be a string (needs a tokenizer), a list of token ids, a
1-D ``[S]`` or 2-D ``[B, S]`` id tensor; :meth:`RouterAnalyzer.specialization` takes ``(item, label)`` pairs.
Sequences of different lengths are right-padded and masked, so padding never enters a statistic.

Example:
    >>> import torch
    >>> from moe_lab.analytics import RouterAnalyzer
    >>> from moe_lab.models import MoEModel
    >>> analyzer = RouterAnalyzer(MoEModel.from_preset("tiny"))
    >>> layers = analyzer.analyze_batch(torch.randint(0, 256, (2, 8)))
    >>> layers[0].expert_indices.shape   # [B, S, K]
    torch.Size([2, 8, 2])
    >>> spec = analyzer.specialization([([1, 2, 3], "a"), ([200, 201], "b")])
    >>> 0.0 <= spec.nmi[0] <= 1.0
    True
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from moe_lab.nn.router import RoutingDecision

__all__ = [
    "CheckpointComparison",
    "LayerRouting",
    "RouterAnalyzer",
    "SpecializationResult",
    "compare_checkpoints",
    "normalized_mutual_information",
]


@dataclass
class LayerRouting:
    """Per-token routing of one MoE layer for a ``[B, S]`` batch."""

    layer: int
    expert_indices: Tensor  # [B, S, K]
    combine_weights: Tensor  # [B, S, K]
    chosen: Tensor  # [B, S, K] bool, chosen slots (kept or dropped)
    router_probs: Tensor  # [B, S, E]
    token_mask: Tensor  # [B, S] bool, False = padding

    @property
    def top1(self) -> Tensor:
        """``[B, S]`` the expert with the highest router probability."""
        return self.router_probs.argmax(-1)

    def expert_sets(self, num_experts: int) -> Tensor:
        """``[B, S, E]`` bool: the experts each token chose."""
        onehot = torch.nn.functional.one_hot(self.expert_indices.clamp(0, num_experts - 1), num_experts)
        return (onehot * self.chosen.unsqueeze(-1)).sum(-2) > 0


def normalized_mutual_information(counts_LE: Tensor) -> float:
    """NMI of a contingency table (rows: labels, columns: experts), ``2 I / (H_L + H_E)`` in ``[0, 1]``.

    0 when routing says nothing about the label, 1 when each label maps to its own expert(s) and back.
    """
    c = counts_LE.to(torch.float64)
    n = float(c.sum())
    if n <= 0:
        return 0.0
    p = c / n
    pl, pe = p.sum(1, keepdim=True), p.sum(0, keepdim=True)
    nz = p > 0
    mi = float((p[nz] * (p[nz] / (pl @ pe)[nz]).log()).sum())
    h_l = float(-(pl[pl > 0] * pl[pl > 0].log()).sum())
    h_e = float(-(pe[pe > 0] * pe[pe > 0].log()).sum())
    if h_l + h_e <= 0:
        return 0.0
    return max(0.0, min(1.0, 2 * mi / (h_l + h_e)))


@dataclass
class SpecializationResult:
    """Label x expert token counts per MoE layer and their normalised mutual information."""

    labels: list[str]
    counts: list[list[list[int]]]  # [layer][label][expert]
    nmi: list[float]

    def shares(self, layer: int) -> list[list[float]]:
        """Row-normalised counts: the share of each label's tokens that went to each expert."""
        out = []
        for row in self.counts[layer]:
            total = sum(row)
            out.append([x / total if total else 0.0 for x in row])
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"labels": self.labels, "counts": self.counts, "nmi": self.nmi}


@dataclass
class CheckpointComparison:
    """How routing differs between two models on the same tokens, for one MoE layer."""

    layer: int
    num_tokens: int
    top1_changed: float
    mean_jaccard: float
    load_a: list[float]
    load_b: list[float]


class RouterAnalyzer:
    """Token-level routing analysis of a model whose forward returns ``.routing`` (see ``MoEOutput``).

    Args:
        model: an ``MoEModel`` (or any module returning an object with ``routing: list[RoutingDecision]``).
        tokenizer: needed for string data and to show tokens as text (``encode`` / ``decode``).
        batch_size: sequences per forward.
        max_length: truncate longer sequences (default: the model's ``max_seq_len`` when known).
    """

    def __init__(
        self, model: nn.Module, tokenizer: Any = None, *, batch_size: int = 16, max_length: int | None = None
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        cfg = getattr(model, "config", None)
        self.max_length = max_length or getattr(cfg, "max_seq_len", None)

    # ------------------------------------------------------------------------------ plumbing
    def _device(self, model: nn.Module | None = None) -> torch.device:
        p = next((model or self.model).parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def _encode(self, item: Any) -> list[Tensor]:
        if isinstance(item, str):
            if self.tokenizer is None:
                raise ValueError("text data needs a tokenizer: RouterAnalyzer(model, tokenizer=...)")
            ids = torch.tensor(self.tokenizer.encode(item), dtype=torch.long)
            rows = [ids]
        elif isinstance(item, Tensor):
            if item.dim() not in (1, 2):
                raise ValueError(f"input_ids tensor must be [S] or [B, S], got shape {tuple(item.shape)}")
            rows = list(item.long().reshape(-1, item.shape[-1]))
        elif isinstance(item, (list, tuple)) and all(isinstance(x, int) for x in item):
            rows = [torch.tensor(list(item), dtype=torch.long)]
        else:
            raise ValueError(
                f"data item must be text, a list of token ids or an id tensor, got {type(item).__name__}"
            )
        if self.max_length:
            rows = [r[: self.max_length] for r in rows]
        return [r for r in rows if r.numel() > 0]

    def _batches(
        self, data: Iterable[Any], labelled: bool = False
    ) -> Iterator[tuple[Tensor, Tensor, list[Any]]]:
        """Yields ``(input_ids [B, S], mask [B, S], labels per row)`` with right padding."""
        rows: list[Tensor] = []
        labels: list[Any] = []

        def flush() -> tuple[Tensor, Tensor, list[Any]]:
            s = max(r.numel() for r in rows)
            ids = torch.zeros(len(rows), s, dtype=torch.long)
            mask = torch.zeros(len(rows), s, dtype=torch.bool)
            for i, r in enumerate(rows):
                ids[i, : r.numel()] = r
                mask[i, : r.numel()] = True
            return ids, mask, list(labels)

        for item in data:
            if labelled:
                if not (isinstance(item, (tuple, list)) and len(item) == 2):
                    raise ValueError("specialization data must be (text or ids, label) pairs")
                item, label = item
            else:
                label = None
            for r in self._encode(item):
                rows.append(r)
                labels.append(label)
                if len(rows) == self.batch_size:
                    yield flush()
                    rows, labels = [], []
        if rows:
            yield flush()

    @torch.no_grad()
    def _route(self, model: nn.Module, ids_BS: Tensor, mask_BS: Tensor | None) -> list[LayerRouting]:
        was_training = model.training
        model.eval()
        try:
            dev = self._device(model)
            ids_BS = ids_BS.to(dev)
            all_real = mask_BS is None or bool(mask_BS.all())
            kwargs = {} if all_real else {"attention_mask": mask_BS.to(dev).long()}  # type: ignore[union-attr]
            out = model(ids_BS, **kwargs)
        finally:
            model.train(was_training)
        routing = getattr(out, "routing", None)
        if routing is None and isinstance(out, (tuple, list)):
            routing = [x for x in out if isinstance(x, RoutingDecision)]
        if not routing:
            raise ValueError(f"{type(model).__name__} returned no routing decisions (is it an MoE model?)")
        b, s = ids_BS.shape
        mask = torch.ones(b, s, dtype=torch.bool) if mask_BS is None else mask_BS.to(torch.bool).cpu()
        layers = []
        for i, d in enumerate(routing):
            k = d.expert_indices.shape[-1]
            layers.append(
                LayerRouting(
                    layer=i,
                    expert_indices=d.expert_indices.detach().cpu().view(b, s, k),
                    combine_weights=d.combine_weights.detach().float().cpu().view(b, s, k),
                    chosen=(d.slot_mask | d.dropped).detach().cpu().view(b, s, k) & mask.unsqueeze(-1),
                    router_probs=d.router_probs.detach().float().cpu().view(b, s, -1),
                    token_mask=mask,
                )
            )
        return layers

    # ------------------------------------------------------------------------------ analyses
    def analyze_batch(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> list[LayerRouting]:
        """Per-token experts, combine weights and router probabilities of every MoE layer for one batch."""
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
            attention_mask = None if attention_mask is None else attention_mask[None]
        return self._route(self.model, input_ids, attention_mask)

    def specialization(
        self, dataset: Iterable[tuple[Any, Any]], *, top1: bool = True
    ) -> SpecializationResult:
        """Label x expert counts per layer and their NMI.

        Each non-padding token carries its sample's label and is counted for its top-1 expert (or, with
        ``top1=False``, once for every expert it chose).
        """
        label_index: dict[Any, int] = {}
        tables: list[Tensor] = []
        for ids, mask, labels in self._batches(dataset, labelled=True):
            for lab in labels:
                label_index.setdefault(lab, len(label_index))
            lab_BS = torch.tensor([label_index[x] for x in labels])[:, None].expand_as(ids)
            for layer in self._route(self.model, ids, mask):
                e = layer.router_probs.shape[-1]
                while len(tables) <= layer.layer:
                    tables.append(torch.zeros(0, e, dtype=torch.long))
                t = tables[layer.layer]
                if t.shape[0] < len(label_index):
                    t = torch.cat([t, torch.zeros(len(label_index) - t.shape[0], e, dtype=torch.long)])
                if top1:
                    lab_N, exp_N = lab_BS[layer.token_mask], layer.top1[layer.token_mask]
                else:
                    sets_BSE = layer.expert_sets(e) & layer.token_mask[..., None]
                    nz = sets_BSE.nonzero()
                    lab_N, exp_N = lab_BS[nz[:, 0], nz[:, 1]], nz[:, 2]
                t.index_put_((lab_N, exp_N), torch.ones_like(lab_N), accumulate=True)
                tables[layer.layer] = t
        if not label_index:
            raise ValueError("specialization needs at least one (item, label) pair")
        return SpecializationResult(
            labels=[str(x) for x in label_index],
            counts=[t.tolist() for t in tables],
            nmi=[normalized_mutual_information(t) for t in tables],
        )

    def top_tokens_per_expert(self, data: Iterable[Any], k: int = 10) -> list[list[list[tuple[Any, int]]]]:
        """``[layer][expert]`` -> the ``k`` most frequent tokens routed there as ``(token, count)``.

        Tokens are decoded to text when a tokenizer is set, else token ids. Counts chosen slots.
        """
        counters: list[Tensor] = []
        for ids, mask, _ in self._batches(data):
            for layer in self._route(self.model, ids, mask):
                e = layer.router_probs.shape[-1]
                sets_BSE = layer.expert_sets(e) & layer.token_mask[..., None]
                nz = sets_BSE.nonzero()
                vocab = int(ids.max()) + 1
                while len(counters) <= layer.layer:
                    counters.append(torch.zeros(e, 0, dtype=torch.long))
                c = counters[layer.layer]
                if c.shape[1] < vocab:
                    c = torch.cat([c, torch.zeros(e, vocab - c.shape[1], dtype=torch.long)], 1)
                c.index_put_(
                    (nz[:, 2], ids[nz[:, 0], nz[:, 1]]),
                    torch.ones(len(nz), dtype=torch.long),
                    accumulate=True,
                )
                counters[layer.layer] = c
        out = []
        for c in counters:
            per_expert = []
            for row in c:
                vals, idx = row.topk(min(k, row.numel()))
                per_expert.append([(self._show(int(i)), int(v)) for v, i in zip(vals, idx) if int(v) > 0])
            out.append(per_expert)
        return out

    def _show(self, token_id: int) -> Any:
        if self.tokenizer is None:
            return token_id
        return self.tokenizer.decode([token_id])

    def token_affinity(self, tokens: list[Any], data: Iterable[Any] | None = None) -> list[Tensor]:
        """Per layer ``[len(tokens), E]`` mean router probabilities of each token.

        Without ``data`` each token is routed alone (position 0, no context); with ``data`` the mean over
        the token's occurrences in it (rows of zeros for tokens that never occur).
        """
        ids = []
        for t in tokens:
            enc = self._encode(t if not isinstance(t, int) else [t])[0]
            if enc.numel() != 1:
                raise ValueError(f"token {t!r} encodes to {enc.numel()} ids; pass single tokens or ids")
            ids.append(int(enc[0]))
        if data is None:
            layers = self._route(self.model, torch.tensor(ids)[:, None], None)
            return [layer.router_probs[:, 0] for layer in layers]
        sums: list[Tensor] = []
        counts = torch.zeros(len(ids))
        want = torch.tensor(ids)
        for batch, mask, _ in self._batches(data):
            match_BSN = (batch[..., None] == want) & mask[..., None]
            counts += match_BSN.sum((0, 1))
            for layer in self._route(self.model, batch, mask):
                add = torch.einsum("bsn,bse->ne", match_BSN.float(), layer.router_probs)
                if len(sums) <= layer.layer:
                    sums.append(torch.zeros_like(add))
                sums[layer.layer] += add
        return [s / counts.clamp_min(1)[:, None] for s in sums]

    def compare_checkpoints(
        self, model_a: nn.Module, model_b: nn.Module, data: Iterable[Any]
    ) -> list[CheckpointComparison]:
        """See :func:`compare_checkpoints` (uses this analyzer's tokenizer and batching)."""
        changed: list[float] = []
        jacc: list[float] = []
        loads_a: list[Tensor] = []
        loads_b: list[Tensor] = []
        n_tokens = 0
        for ids, mask, _ in self._batches(data):
            ra, rb = self._route(model_a, ids, mask), self._route(model_b, ids, mask)
            if len(ra) != len(rb):
                raise ValueError(f"models have {len(ra)} and {len(rb)} MoE layers; cannot compare")
            n_tokens += int(mask.sum())
            for i, (la, lb) in enumerate(zip(ra, rb)):
                e = la.router_probs.shape[-1]
                if lb.router_probs.shape[-1] != e:
                    raise ValueError(f"layer {i}: {e} vs {lb.router_probs.shape[-1]} experts; cannot compare")
                sa, sb = la.expert_sets(e)[mask], lb.expert_sets(e)[mask]
                inter, union = (sa & sb).sum(-1).float(), (sa | sb).sum(-1).float()
                j = torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))
                if len(changed) <= i:
                    changed.append(0.0)
                    jacc.append(0.0)
                    loads_a.append(torch.zeros(e))
                    loads_b.append(torch.zeros(e))
                changed[i] += float((la.top1[mask] != lb.top1[mask]).sum())
                jacc[i] += float(j.sum())
                loads_a[i] += sa.sum(0).float()
                loads_b[i] += sb.sum(0).float()
        if n_tokens == 0:
            raise ValueError("compare_checkpoints needs non-empty data")
        return [
            CheckpointComparison(
                layer=i,
                num_tokens=n_tokens,
                top1_changed=changed[i] / n_tokens,
                mean_jaccard=jacc[i] / n_tokens,
                load_a=(loads_a[i] / loads_a[i].sum().clamp_min(1)).tolist(),
                load_b=(loads_b[i] / loads_b[i].sum().clamp_min(1)).tolist(),
            )
            for i in range(len(changed))
        ]


def compare_checkpoints(
    model_a: nn.Module, model_b: nn.Module, data: Iterable[Any], tokenizer: Any = None
) -> list[CheckpointComparison]:
    """Per MoE layer: fraction of tokens whose top-1 expert changed, mean Jaccard of the chosen expert sets,
    and both load distributions, for two models (e.g. two checkpoints of one run) on the same data."""
    return RouterAnalyzer(model_a, tokenizer).compare_checkpoints(model_a, model_b, data)
