"""PyTorch eager port of dff_jax.models.Recommender and the in-batch logQ / full softmax / BCE losses (needs torch).

Used as (a) the baseline that `python -m dff_jax.bench` times against the jitted JAX train step
(``torch_step_for_run``); (b) a parity reference: the same weights (``load_nnx_weights``) give the same item
embeddings, sequence outputs and loss as the JAX model to 1e-5 in float32 (tests/test_parity.py).

The math mirrors dff_jax/models.py line for line (MicroLens SASRec, docs/protocol.md section 4), module for module
(``items`` = the item encoder, ``sasrec`` = the sequence encoder, so parameter names match the NNX paths): LayerNorm(item + position) -> dropout -> post-LN blocks (bias-free Q/K/V/O, attention-probability
dropout, FFN 4d ReLU), causal + key-padding mask with the diagonal always allowed; item encoders id / replace / fusion
with the content aggregation of paper Eq. 5 (layer / mean / learned alpha, optional standardisation) and the gate of
Eq. 3-4. ``arch="sasrec"`` ports ``models.OriginalBlock`` and ``SASRec._original`` (Kang & McAuley's SASRec as the
popular PyTorch port builds it): sqrt(d)-scaled items plus positions that are zero on padding, causal-only attention
with biases through ``F.scaled_dot_product_attention`` (what ``nn.MultiheadAttention`` runs), FFN d -> d -> d, final
LayerNorm, eps 1e-8. Dropout uses torch's own RNG, so only deterministic outputs are comparable.

Threads: torch keeps its default intra-op thread count (torch.get_num_threads(), the number of physical cores),
which is also what XLA's CPU backend uses, so neither side is handicapped.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

LN_EPS = 1e-6
ORIGINAL_LN_EPS = 1e-8  # arch="sasrec"
MASK_VALUE = -1e9
INBATCH_MASK = -1e4


def _xavier_normal_(t: torch.Tensor) -> torch.Tensor:
    return nn.init.xavier_normal_(t)


class TorchContent(nn.Module):
    """e_v = Proj(Norm(sum_l alpha_l h_l)); the feature table and statistics are buffers (frozen)."""

    def __init__(
        self, table: np.ndarray, *, embed_dim: int, content: str, feature_norm: str, alpha_softmax: bool, proj_hidden
    ):
        super().__init__()
        d = int(embed_dim)
        self.content, self.feature_norm, self.alpha_softmax = content, feature_norm, bool(alpha_softmax)
        self.num_layers, hidden = int(table.shape[1]), int(table.shape[2])
        if self.feature_norm == "standardize":
            from dff_jax.models import standardized_table  # numpy only; the same stored table as the JAX model

            table = np.array(standardized_table(np.asarray(table)))  # a writable host copy for torch
        self.register_buffer("table", _to_torch(table))
        if self.content == "learned":
            init = 0.0 if self.alpha_softmax else 1.0 / self.num_layers
            self.layer_logits = nn.Parameter(torch.full((self.num_layers,), init))
        if self.feature_norm == "layernorm":
            self.feature_ln = nn.LayerNorm(hidden, eps=LN_EPS)
        self.proj = nn.Linear(hidden, proj_hidden if proj_hidden > 0 else d)
        self.proj_out = nn.Linear(proj_hidden, d) if proj_hidden > 0 else None

    def weights(self) -> torch.Tensor:
        if self.content == "learned":
            return torch.softmax(self.layer_logits, 0) if self.alpha_softmax else self.layer_logits
        return torch.full((self.num_layers,), 1.0 / self.num_layers, device=self.table.device)

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        rows = self.table[items].float()  # [..., L, H]
        # Multiply-and-sum, as the JAX model does; torch's einsum form of a weighted layer sum measured 25x slower
        # (3.6 s vs 0.14 s fwd+bwd at the CPU preset), which would flatter JAX.
        x = (rows * self.weights()[:, None]).sum(-2)
        if self.feature_norm == "layernorm":
            x = self.feature_ln(x)
        x = self.proj(x)
        if self.proj_out is not None:
            x = self.proj_out(F.gelu(x, approximate="tanh"))  # jax.nn.gelu defaults to the tanh approximation
        return x


class TorchBlock(nn.Module):
    def __init__(self, d: int, num_heads: int, rate: float, pre_ln: bool):
        super().__init__()
        self.num_heads, self.rate, self.pre_ln = num_heads, rate, pre_ln
        self.query = nn.Linear(d, d, bias=False)
        self.key = nn.Linear(d, d, bias=False)
        self.value = nn.Linear(d, d, bias=False)
        self.out = nn.Linear(d, d, bias=False)
        self.attn_ln = nn.LayerNorm(d, eps=LN_EPS)
        self.ffn_in = nn.Linear(d, 4 * d)
        self.ffn_out = nn.Linear(4 * d, d)
        self.ffn_ln = nn.LayerNorm(d, eps=LN_EPS)

    def attention(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        b, length, d = x.shape
        h = self.num_heads
        q = self.query(x).view(b, length, h, d // h).transpose(1, 2)
        k = self.key(x).view(b, length, h, d // h).transpose(1, 2)
        v = self.value(x).view(b, length, h, d // h).transpose(1, 2)
        scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(d // h)
        scores = scores.masked_fill(~allowed[:, None], MASK_VALUE)
        probs = F.dropout(torch.softmax(scores, -1), self.rate, self.training)
        context = torch.matmul(probs, v).transpose(1, 2).reshape(b, length, d)
        return F.dropout(self.out(context), self.rate, self.training)

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(self.ffn_out(F.relu(self.ffn_in(x))), self.rate, self.training)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        if self.pre_ln:
            x = x + self.attention(self.attn_ln(x), allowed)
            return x + self.feed_forward(self.ffn_ln(x))
        x = self.attn_ln(x + self.attention(x, allowed))
        return self.ffn_ln(x + self.feed_forward(x))


class TorchOriginalBlock(nn.Module):
    """The port of ``dff_jax.models.OriginalBlock`` (arch="sasrec")."""

    def __init__(self, d: int, num_heads: int, rate: float, pre_ln: bool):
        super().__init__()
        self.num_heads, self.rate, self.pre_ln = num_heads, rate, pre_ln
        self.query, self.key, self.value, self.out = (nn.Linear(d, d) for _ in range(4))
        self.attn_ln = nn.LayerNorm(d, eps=ORIGINAL_LN_EPS)
        self.ffn_in, self.ffn_out = nn.Linear(d, d), nn.Linear(d, d)
        self.ffn_ln = nn.LayerNorm(d, eps=ORIGINAL_LN_EPS)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        b, length, d = x.shape
        h = self.num_heads
        q, k, v = (f(x).view(b, length, h, d // h).transpose(1, 2) for f in (self.query, self.key, self.value))
        rate = self.rate if self.training else 0.0
        context = F.scaled_dot_product_attention(q, k, v, dropout_p=rate, is_causal=True)
        return self.out(context.transpose(1, 2).reshape(b, length, d))

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = F.relu(F.dropout(self.ffn_in(x), self.rate, self.training))
        return F.dropout(self.ffn_out(hidden), self.rate, self.training)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor | None = None) -> torch.Tensor:
        if self.pre_ln:
            x = x + self.attention(self.attn_ln(x))
            return x + self.feed_forward(self.ffn_ln(x))
        x = self.attn_ln(x + self.attention(x))
        return self.ffn_ln(x + self.feed_forward(x))


class TorchItemEncoder(nn.Module):
    """The port of ``dff_jax.models.ItemEncoder`` (id / replace / fusion)."""

    def __init__(self, num_items: int, table, *, item_encoder, embed_dim, content, feature_norm, alpha_softmax,
                 proj_hidden, gate_hidden, gate_dim):  # fmt: skip
        super().__init__()
        d = int(embed_dim)
        self.kind, self.num_items = item_encoder, int(num_items)
        if item_encoder != "replace":
            self.item_id = nn.Parameter(_xavier_normal_(torch.empty(num_items + 1, d)))
            with torch.no_grad():
                self.item_id[0].zero_()
        self.content = (
            None
            if item_encoder == "id"
            else TorchContent(
                table,
                embed_dim=d,
                content=content,
                feature_norm=feature_norm,
                alpha_softmax=alpha_softmax,
                proj_hidden=proj_hidden,
            )
        )
        if item_encoder == "fusion":
            gate_out = d if gate_dim == "vector" else 1
            self.gate_in = nn.Linear(2 * d, gate_hidden) if gate_hidden > 0 else None
            self.gate_out = nn.Linear(gate_hidden if gate_hidden > 0 else 2 * d, gate_out)

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        if self.kind == "id":
            emb = self.item_id[items]
        else:
            e_v = self.content(items)
            if self.kind == "replace":
                emb = e_v
            else:
                e_id = self.item_id[items]
                x = torch.cat([e_id, e_v], -1)
                if self.gate_in is not None:
                    x = F.relu(self.gate_in(x))
                g = torch.sigmoid(self.gate_out(x))
                emb = g * e_id + (1.0 - g) * e_v
        return emb * (items != 0).unsqueeze(-1).to(emb.dtype)


class TorchSASRec(nn.Module):
    """The port of ``dff_jax.models.SASRec``."""

    def __init__(self, *, arch="microlens", embed_dim, max_seq_len, num_blocks, num_heads, dropout, pre_ln):
        super().__init__()
        d = int(embed_dim)
        self.arch, self.rate, self.pre_ln = arch, float(dropout), bool(pre_ln)
        self.position = nn.Parameter(_xavier_normal_(torch.empty(int(max_seq_len), d)))
        self.seq_ln = nn.LayerNorm(d, eps=LN_EPS if arch == "microlens" else ORIGINAL_LN_EPS)
        block = TorchBlock if arch == "microlens" else TorchOriginalBlock
        self.blocks = nn.ModuleList([block(d, num_heads, self.rate, self.pre_ln) for _ in range(num_blocks)])

    def forward(self, x: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        length = inputs.shape[1]
        if self.arch == "sasrec":
            valid = (inputs != 0).unsqueeze(-1)
            x = x * math.sqrt(x.shape[-1]) + torch.where(valid, self.position[:length], torch.zeros_like(x))
            x = F.dropout(x, self.rate, self.training)
            for block in self.blocks:
                x = block(x)
            return self.seq_ln(x)
        x = x + self.position[:length]
        if not self.pre_ln:
            x = self.seq_ln(x)
        x = F.dropout(x, self.rate, self.training)
        valid = inputs != 0
        eye = torch.eye(length, dtype=torch.bool, device=inputs.device)
        causal = torch.tril(torch.ones(length, length, dtype=torch.bool, device=inputs.device))
        allowed = causal[None] & (valid[:, None, :] | eye[None])
        for block in self.blocks:
            x = block(x, allowed)
        if self.pre_ln:
            x = self.seq_ln(x)
        return x


class TorchRecommender(nn.Module):
    """The port of ``dff_jax.models.Recommender``: ``TorchRecommender(num_items, table, **config.model)`` with the
    table already cut to the model's rows (same parameter names as the NNX paths, kernels in torch layout).

    ``layer``/``layers`` (the table is already cut), ``cold_id``, ``dedup`` and ``rng_impl`` change nothing here: the
    port's weights are copied from a JAX model (``load_nnx_weights``), deduplication does not change the values and
    dropout draws from torch's RNG.
    """

    def __init__(self, num_items: int, table: np.ndarray | None = None, *, embed_dim, num_blocks, num_heads, dropout,
                 pre_ln, max_seq_len, item_encoder, content, feature_norm, alpha_softmax, proj_hidden, gate_hidden,
                 gate_dim, arch="microlens", layer=-1, layers=(), cold_id="random", dedup="auto",
                 rng_impl="threefry2x32", content_init="default"):  # fmt: skip
        super().__init__()
        del layer, layers, cold_id, dedup, rng_impl, content_init  # content_init: the weights come from JAX
        self.num_items, self.embed_dim = int(num_items), int(embed_dim)
        self.items = TorchItemEncoder(
            num_items,
            table,
            item_encoder=item_encoder,
            embed_dim=embed_dim,
            content=content,
            feature_norm=feature_norm,
            alpha_softmax=alpha_softmax,
            proj_hidden=proj_hidden,
            gate_hidden=gate_hidden,
            gate_dim=gate_dim,
        )
        self.sasrec = TorchSASRec(
            arch=arch,
            embed_dim=embed_dim,
            max_seq_len=max_seq_len,
            num_blocks=num_blocks,
            num_heads=num_heads,
            dropout=dropout,
            pre_ln=pre_ln,
        )

    def item_embeddings(self, items: torch.Tensor) -> torch.Tensor:
        return self.items(items)

    def all_item_embeddings(self) -> torch.Tensor:
        return self.items(torch.arange(self.num_items + 1, device=self.sasrec.position.device))

    def encode(self, inputs: torch.Tensor, input_embs: torch.Tensor | None = None) -> torch.Tensor:
        """[B, L] -> [B, L, d]; dropout follows ``self.training``."""
        x = self.items(inputs) if input_embs is None else input_embs
        return self.sasrec(x, inputs)


def inbatch_logq_loss(seq_out, window_emb, window, valid, log_pop):
    """Torch twin of ``dff_jax.losses.inbatch_logq_loss`` (MicroLens in-batch softmax, logQ, own-item masking)."""
    b, length, d = seq_out.shape
    slots = b * (length + 1)
    cand = window.reshape(slots)
    logits = torch.einsum("bld,cd->blc", seq_out, window_emb.reshape(slots, d))
    if log_pop is not None:
        logits = logits - log_pop[cand]
    label = torch.arange(b, device=window.device)[:, None] * (length + 1) + torch.arange(1, length + 1)[None, :]
    own = (window[:, :, None] == cand[None, None, :]).any(1)
    reject = (own | (cand == 0)[None, :])[:, None, :]
    is_label = torch.arange(slots, device=window.device)[None, None, :] == label[:, :, None]
    logits = logits.masked_fill(reject & ~is_label, INBATCH_MASK)
    return F.cross_entropy(logits[valid], label[valid])


def full_softmax_loss(seq_out, item_emb, targets, valid):
    """Torch twin of ``dff_jax.losses.full_softmax_loss``."""
    logits = torch.einsum("bld,nd->bln", seq_out, item_emb)
    logits[..., 0] = MASK_VALUE
    return F.cross_entropy(logits[valid], targets[valid])


def bce_loss(seq_out, pos_emb, neg_emb, valid, neg_valid):
    """Torch twin of ``dff_jax.losses.bce_loss``: the port's two ``BCEWithLogitsLoss`` means over scored positions."""
    pos = (seq_out * pos_emb).sum(-1)[valid]
    neg = (seq_out * neg_emb).sum(-1)[valid & neg_valid]
    return F.binary_cross_entropy_with_logits(pos, torch.ones_like(pos)) + F.binary_cross_entropy_with_logits(
        neg, torch.zeros_like(neg)
    )


def sample_bce_negatives(window: torch.Tensor, num_items: int, rounds: int = 4):
    """Torch twin of ``dff_jax.losses.sample_bce_negatives`` (torch's RNG): one uniform negative per position,
    redrawn up to ``rounds`` times while it is in the user's window; returns (negatives, ok)."""
    b, length = window.shape[0], window.shape[1] - 1
    draws = torch.randint(1, num_items + 1, (rounds + 1, b, length))

    def collides(neg):
        return (neg[:, :, None] == window[:, None, :]).any(-1)

    neg = draws[0]
    for candidate in draws[1:]:
        neg = torch.where(collides(neg), candidate, neg)
    return neg, ~collides(neg)


def compute_loss(model: TorchRecommender, inputs, targets, loss_name: str, log_pop, negatives=None, neg_ok=None):
    """Torch twin of ``dff_jax.losses.compute_loss`` for "inbatch_logq" (log_pop None = no logQ), "full_softmax"
    and "bce" (``negatives`` [B, L] and ``neg_ok`` [B, L] given, e.g. the JAX step's, for parity checks; None:
    sampled with torch's RNG)."""
    valid = (inputs != 0) & (targets != 0)
    if loss_name == "inbatch_logq":
        window = torch.cat([inputs, targets[:, -1:]], 1)
        window_emb = model.item_embeddings(window)
        seq_out = model.encode(inputs, input_embs=window_emb[:, :-1])
        return inbatch_logq_loss(seq_out, window_emb, window, valid, log_pop)
    if loss_name == "full_softmax":
        return full_softmax_loss(model.encode(inputs), model.all_item_embeddings(), targets, valid)
    if loss_name == "bce":
        window = torch.cat([inputs, targets[:, -1:]], 1)
        if negatives is None:
            negatives, neg_ok = sample_bce_negatives(window, model.num_items)
        length = inputs.shape[1]
        emb = model.item_embeddings(torch.cat([window, negatives], 1))
        seq_out = model.encode(inputs, input_embs=emb[:, :length])
        return bce_loss(seq_out, emb[:, 1 : length + 1], emb[:, length + 1 :], valid, neg_ok)
    raise ValueError(f"torch port: loss {loss_name!r} is not ported (inbatch_logq, full_softmax, bce)")


def _to_torch(array) -> torch.Tensor:
    a = np.asarray(array)
    if a.dtype.name == "bfloat16":  # numpy has no bf16; go through the raw bits
        return torch.from_numpy(a.view(np.uint16).astype(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(a))


def nnx_state_dict(nnx_model) -> dict[str, torch.Tensor]:
    """The NNX model's parameters and frozen buffers under the torch port's names.

    Mapping: path joined with "."; Linear ``kernel`` [in, out] -> ``weight`` [out, in]; LayerNorm ``scale`` ->
    ``weight``; everything else (``item_id``, ``position``, ``layer_logits``, ``table``) by name.
    """
    from flax import nnx

    out = {}
    for path, var in nnx.to_flat_state(nnx.state(nnx_model)):
        name = ".".join(str(p) for p in path)
        value = np.asarray(var[...])
        if path[-1] == "kernel":
            name, value = name[: -len("kernel")] + "weight", value.T
        elif path[-1] == "scale":
            name = name[: -len("scale")] + "weight"
        out[name] = _to_torch(value.copy())
    return out


def load_nnx_weights(torch_model: TorchRecommender, nnx_model) -> TorchRecommender:
    """Copies every parameter and buffer of ``nnx_model`` into ``torch_model`` (strict: names must all match)."""
    torch_model.load_state_dict(nnx_state_dict(nnx_model), strict=True)
    return torch_model


def config_from_nnx(nnx_model) -> dict:
    """The ``TorchRecommender`` keywords that rebuild ``nnx_model``'s architecture (read off its attributes and
    shapes)."""
    items, sasrec = nnx_model.items, nnx_model.sasrec
    cfg = {
        "embed_dim": nnx_model.embed_dim,
        "max_seq_len": int(sasrec.position.shape[0]),
        "num_blocks": len(sasrec.blocks),
        "num_heads": sasrec.num_heads,
        "dropout": sasrec.rate,
        "pre_ln": sasrec.pre_ln,
        "arch": sasrec.arch,
        "item_encoder": items.kind,
        "content": "layer",
        "feature_norm": "none",
        "alpha_softmax": True,
        "proj_hidden": 0,
        "gate_hidden": 0,
        "gate_dim": "vector",
    }
    content = items.content
    if content is not None:
        cfg.update(
            content=content.content,
            feature_norm=content.feature_norm,
            alpha_softmax=content.alpha_softmax,
            proj_hidden=int(content.proj.kernel.shape[1]) if content.proj_out is not None else 0,
        )
    if items.kind == "fusion":
        cfg["gate_hidden"] = int(items.gate_in.kernel.shape[1]) if items.gate_in is not None else 0
        cfg["gate_dim"] = "vector" if int(items.gate_out.kernel.shape[1]) == nnx_model.embed_dim else "scalar"
    return cfg


def torch_train_step(
    model: TorchRecommender,
    log_pop: np.ndarray | None,
    *,
    loss_name: str,
    lr: float,
    b1: float,
    b2: float,
    weight_decay: float,
    clip_norm: float,
):
    """An eager PyTorch AdamW train step on the ported model, for the benchmark.

    Like the JAX step: AdamW (betas ``b1``, ``b2``) with weight decay on tensors of rank >= 2 only
    (``train_state.decay_mask``), global norm clipping when ``clip_norm`` > 0, dropout on.

    Returns:
        ``step(batch)`` with batch = {"inputs", "targets"} ([B, L] int arrays) or ``step(inputs, targets)``,
        returning the loss as a float; ``step.model`` is the torch model.
    """
    model.train()
    params = list(model.parameters())
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=lr, betas=(b1, b2))
    log_pop_t = None if log_pop is None else torch.from_numpy(np.array(log_pop, np.float32))

    def step(batch, targets=None) -> float:
        inputs = batch["inputs"] if targets is None else batch
        targets = batch["targets"] if targets is None else targets
        inputs_t = torch.as_tensor(np.asarray(inputs), dtype=torch.long)
        targets_t = torch.as_tensor(np.asarray(targets), dtype=torch.long)
        opt.zero_grad(set_to_none=True)
        loss = compute_loss(model, inputs_t, targets_t, loss_name, log_pop_t)
        loss.backward()
        if clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, clip_norm)
        opt.step()
        return float(loss.detach())

    step.model = model
    return step


def torch_step_for_run(static: dict, state: dict, frozen: dict, config) -> Callable:
    """``torch_train_step`` for a JAX run (``train_state.create_train_state``): the same initial weights, feature
    table, log popularity, loss and optimizer settings, seeded with ``config.seed`` for dropout."""
    from dff_jax import train_state

    nnx_model = train_state.model_of(static, state["params"], frozen)
    content = nnx_model.items.content
    table = None if content is None else np.asarray(content.table[...])
    torch.manual_seed(int(config.seed))
    # load_nnx_weights copies the frozen table too, so the port ends up with the JAX model's stored table.
    model = load_nnx_weights(TorchRecommender(nnx_model.num_items, table, **config_from_nnx(nnx_model)), nnx_model)
    log_pop = np.asarray(frozen["log_pop"]) if config.loss.logq else None
    o = config.optim
    return torch_train_step(
        model,
        log_pop,
        loss_name=str(config.loss.name),
        lr=float(o.lr),
        b1=float(o.b1),
        b2=float(o.b2),
        weight_decay=float(o.weight_decay),
        clip_norm=float(o.clip_norm),
    )


def torch_evaluate(model: TorchRecommender, dataset, split: str, *, batch_size: int, negatives: np.ndarray) -> dict:
    """The port's evaluation of ``split``, as ``dff_jax.evaluate.evaluate`` computes it (for the benchmark): full
    ranking over all items with the history masked (rank = 1 + #items scoring strictly above the target) and the
    ranks among the given sampled ``negatives`` [U, K] (``metrics.sample_negatives``), in torch, without gradients.

    Returns {"ranks", "sampled_ranks"} (numpy) for ``metrics.metrics_from_ranks``.
    """
    model.eval()
    ev = getattr(dataset, split)
    full, sampled = [], []
    with torch.no_grad():
        items = model.all_item_embeddings()
        for start in range(0, len(ev["targets"]), batch_size):
            rows = slice(start, start + batch_size)
            inputs = torch.as_tensor(ev["inputs"][rows], dtype=torch.long)
            targets = torch.as_tensor(ev["targets"][rows], dtype=torch.long)
            history = torch.as_tensor(ev["history"][rows], dtype=torch.long)
            user = model.encode(inputs)[:, -1]
            scores = user @ items.T
            target_score = scores.gather(1, targets[:, None])
            scores[:, 0] = -torch.inf
            scores.scatter_(1, history, -torch.inf)  # history 0-padding lands on column 0, already excluded
            scores.scatter_(1, targets[:, None], -torch.inf)
            rank = 1 + (scores > target_score).sum(1)
            in_history = ((history == targets[:, None]) & (history > 0)).any(1)  # a miss, as metrics.target_ranks
            full.append(torch.where(in_history, items.shape[0], rank).numpy())
            neg = items[torch.as_tensor(negatives[rows], dtype=torch.long)]
            neg_scores = (neg * user[:, None]).sum(-1)
            sampled.append((1 + (neg_scores > target_score).sum(1)).numpy())
    model.train()
    return {"ranks": np.concatenate(full), "sampled_ranks": np.concatenate(sampled)}
