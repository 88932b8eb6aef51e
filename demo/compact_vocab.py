"""The tiny QWen's text pretraining over the few token ids the demo uses, exactly equal to a full-vocabulary model.

The tiny QWen keeps the official layout: 151,936 rows of input embeddings and of LM head. The demo's text uses
about 1,030 of them (the tiny BPE's ranks and three specials). Training all rows costs most of a pretraining step
(the 151,936-way softmax, dense gradients and AdamW over 39 M embedding and head weights that the text never
touches), so the pretraining runs on a compact model instead:

- rows 0..n-1 of its embedding and LM head are the used ids' rows, in id order;
- one more LM-head row, the *rest* row, stands for every unused id at once: in the written checkpoint all
  151,936 - n unused LM-head rows are copies of it. Its logit carries a fixed bias of log(151,936 - n), so the
  compact softmax's normaliser is exactly the full one: sum over used ids + (151,936 - n) * exp(rest logit).

So the compact model's loss is the loss the written full-size checkpoint gives on the same text (tested), and
the pretraining still learns to push the unused ids down, as a full-vocabulary training would. Unused input
embedding rows keep their random initial values (the text never reads them; image placeholders are replaced
by image features before the model sees them).
"""

from __future__ import annotations

import math

import torch
from torch import nn

WTE, LM_HEAD = "transformer.wte.weight", "lm_head.weight"


class CompactVocab:
    """Maps full-vocabulary ids to compact rows (unused ids to the rest row) and moves weights between layouts."""

    def __init__(self, used_ids, full_size: int):
        used = sorted({int(i) for i in used_ids})
        if not used or used[0] < 0 or used[-1] >= full_size:
            raise ValueError(f"used ids must lie in 0..{full_size - 1}")
        if len(used) >= full_size:
            raise ValueError("a compact vocabulary must leave at least one id unused")
        self.used = torch.tensor(used)
        self.full_size = full_size
        self.n_used = len(used)
        self.n_rest = full_size - len(used)
        self.rest = self.n_used  # the compact index of the rest row
        self._to_compact = torch.full((full_size,), self.rest, dtype=torch.long)
        self._to_compact[self.used] = torch.arange(self.n_used)

    @property
    def size(self) -> int:
        """Rows of the compact embedding and LM head: the used ids + the rest row."""
        return self.n_used + 1

    def compact_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Full ids -> compact ids; -100 (ignored labels) stays -100. Unused ids in input are an error."""
        ignored = ids == -100
        out = self._to_compact[ids.masked_fill(ignored, 0)]
        if bool(((out == self.rest) & ~ignored).any()):
            bad = ids[(out == self.rest) & ~ignored].unique()[:5].tolist()
            raise ValueError(f"ids outside the compact vocabulary: {bad}")
        return out.masked_fill(ignored, -100)

    def shrink(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A full-size state dict -> the compact one (the rest row of the LM head starts at zero)."""
        out = dict(state_dict)
        wte, head = state_dict[WTE], state_dict[LM_HEAD]
        out[WTE] = torch.cat([wte[self.used], torch.zeros_like(wte[:1])])  # the rest row of wte is never read
        out[LM_HEAD] = torch.cat([head[self.used], torch.zeros_like(head[:1])])
        return out

    def expand(self, compact: dict[str, torch.Tensor], full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The compact model's weights in the full layout: used rows from `compact`, unused input rows from
        `full` (the initial random ones), unused LM-head rows all equal to the rest row."""
        out = {k: v for k, v in compact.items() if k not in (WTE, LM_HEAD, "lm_head.bias")}
        wte = full[WTE].clone()
        wte[self.used] = compact[WTE][: self.n_used].to(wte.dtype)
        head = compact[LM_HEAD][self.rest].to(full[LM_HEAD].dtype).expand(self.full_size, -1).clone()
        head[self.used] = compact[LM_HEAD][: self.n_used].to(head.dtype)
        out[WTE], out[LM_HEAD] = wte, head
        missing = set(full) - set(out)
        if missing:
            raise ValueError(f"compact state dict lacks {sorted(missing)}")
        return out

    def install_head(self, model: nn.Module) -> None:
        """Give a compact QWenLMHeadModel its LM head with the rest row's fixed log(n_rest) bias."""
        old = model.lm_head
        head = nn.Linear(old.in_features, old.out_features, bias=True)
        if old.out_features != self.size:
            raise ValueError(f"the model has {old.out_features} LM-head rows, the compact vocabulary {self.size}")
        with torch.no_grad():
            head.weight.copy_(old.weight)
            head.bias.zero_()
            head.bias[self.rest] = math.log(self.n_rest)
        head.bias.requires_grad_(False)
        model.lm_head = head

    def greedy_logits(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """Logits whose argmax is the full model's greedy choice: the rest row without its bias (the largest
        unused logit, not their sum)."""
        return nn.functional.linear(hidden, model.lm_head.weight)
