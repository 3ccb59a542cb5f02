"""Calibration for every compression method: block inputs, advanced one block at a time, and
per-linear input statistics, captured once and shared by all methods.

Calibrated methods work block by block: the inputs of block i are the outputs of blocks 0..i-1
*after* they were compressed, so later blocks see (and correct for) earlier errors. `BlockInputs`
holds those activations for all samples, (n, T, C) in fp32, and advances them through a block.
`LinearStats` taps a linear's input and keeps X^T X, from which every method reads what it needs:
the GPTQ/SparseGPT Hessian 2 X^T X / rows, Wanda's column norms sqrt(diag X^T X), and SVD-LLM's
whitening Cholesky factor of X^T X.

Takes token ids, never text: reading calibration text is `slmkit.data.calibration`'s job.
"""

from __future__ import annotations

import torch

from slmkit.errors import SlmError
from slmkit.model import Block, CausalLM

# every linear a dense block may have (a block has all or, Phi-2's plain MLP, all but gate_proj)
BLOCK_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def block_linears(block: Block) -> tuple[str, ...]:
    """The block's linears in the order it runs them."""
    return tuple(name for group in block.input_groups() for name in group)


def check_calibration(model: CausalLM, ids: torch.Tensor | None, method: str) -> torch.Tensor:
    """`ids` as (n, T) int64 after checking they fit the model; a one-line error otherwise."""
    c = model.config
    if ids is None:
        raise SlmError(f"{method} needs calibration token ids (read them with slmkit.data.calibration)")
    if c.num_local_experts or c.block_repeats > 1:
        raise SlmError(f"{method} calibrates dense, unshared blocks; this model has experts or shared blocks")
    if ids.dim() != 2 or ids.numel() == 0:
        raise SlmError(f"calibration ids must be a non-empty (samples, seq_len) tensor, got shape {tuple(ids.shape)}")
    if ids.shape[1] > c.max_position_embeddings:
        raise SlmError(f"calibration windows of {ids.shape[1]} tokens exceed the model's context of "
                       f"{c.max_position_embeddings}; use --calib-seq-len {c.max_position_embeddings} or less")
    if int(ids.max()) >= c.vocab_size or int(ids.min()) < 0:
        raise SlmError(f"calibration ids reach {int(ids.max())} but the model has {c.vocab_size} embeddings: "
                       "the calibration text was tokenized with another tokenizer")
    return ids.long()


class BlockInputs:
    """The hidden states entering the current block, for every calibration sample."""

    def __init__(self, model: CausalLM, ids: torch.Tensor, micro_batch: int = 8):
        self.model, self.micro_batch = model, micro_batch
        n, t = ids.shape
        with torch.no_grad():
            self.x = torch.cat([model.embed(ids[i : i + micro_batch]).float()
                                for i in range(0, n, micro_batch)])  # (n, T, C)
        # RoPE tables and masks of every layer kind; each block picks its own
        self.layer_inputs = model.layer_inputs(torch.arange(t).expand(1, t), 0, t, None, torch.float32)

    @property
    def tokens(self) -> int:
        return self.x.shape[0] * self.x.shape[1]

    @torch.no_grad()
    def run(self, block: torch.nn.Module, advance: bool) -> torch.Tensor | None:
        """Forward every sample through `block` (hooks see its inputs); keep the outputs if `advance`.

        Returns the outputs (n, T, C) when advancing, so callers can compare input and output.
        """
        outputs = []
        for i in range(0, self.x.shape[0], self.micro_batch):
            y = block(self.x[i : i + self.micro_batch], self.layer_inputs)
            if advance:
                outputs.append(y)
        if advance:
            self.x = torch.cat(outputs)
            return self.x
        return None

    @torch.no_grad()
    def final_norm(self) -> torch.Tensor:
        """Inputs of the output head, (n*T, C)."""
        return self.model.model.norm(self.x).reshape(-1, self.x.shape[-1])


class LinearStats:
    """A forward pre-hook that accumulates the mean of x x^T over every input row of a linear.

    fp32 like the GPTQ/SparseGPT references: a float64 X^T X over tens of thousands of rows costs
    minutes on a CPU. `xtx` is (K, K) = X^T X / rows.
    """

    def __init__(self, linear: torch.nn.Module):
        k = linear.in_features
        self.xtx = torch.zeros(k, k)
        self.rows = 0
        self.handle = linear.register_forward_pre_hook(self._hook)

    def _hook(self, _module, args):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).float()  # (rows, K)
        total = self.rows + x.shape[0]
        self.xtx.mul_(self.rows / total).addmm_(x.T, x, alpha=1.0 / total)
        self.rows = total

    def close(self) -> LinearStats:
        self.handle.remove()
        return self

    @property
    def hessian(self) -> torch.Tensor:
        """GPTQ/SparseGPT's H = 2 X^T X / rows, (K, K)."""
        return 2.0 * self.xtx

    @property
    def column_norms(self) -> torch.Tensor:
        """Wanda's ||X_j||_2 over the rows, (K,) (scaled by 1/sqrt(rows): only ratios matter)."""
        return torch.diag(self.xtx).clamp_min(0).sqrt()


def block_stats(block: torch.nn.Module, inputs: BlockInputs) -> dict[str, LinearStats]:
    """Run `block` once over the calibration inputs (without advancing them) and return the input
    statistics of every linear of the block (`Block.input_groups`), by name; members of a group share
    one object."""
    taps = {group: LinearStats(block.get_submodule(group[0])) for group in block.input_groups()}
    try:
        inputs.run(block, advance=False)
    finally:
        for stats in taps.values():
            stats.close()
    return {name: stats for group, stats in taps.items() for name in group}
