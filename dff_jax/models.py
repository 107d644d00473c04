"""SASRec over ID, content-replacement and DFF-fusion item embeddings (Flax NNX).

``Recommender`` = ``ItemEncoder`` (item index -> e) + ``SASRec`` (sequence of e -> user vector). The recommender
follows the MicroLens SASRec baseline (docs/protocol.md section 4): learned positions, 2 post-LN Transformer blocks
with 2 heads, FFN 4d with ReLU, LayerNorm eps 1e-6, dropout 0.1, causal + key-padding attention mask, xavier-normal
item ID table with a zero padding row 0, xavier-normal position table and Transformer Linear kernels (MicroLens
``_init_weights``); the content projection and gate MLP use the Flax default init.

Item encoders (``item_encoder``):

* ``id``: e = e_id.
* ``replace``: e = e_v (paper section 4.1, "Replacement"); no ID table is created at all.
* ``fusion``: g = sigmoid(MLP([e_id; e_v])), e = g * e_id + (1 - g) * e_v (paper Eq. 3-4 and Eq. 6-7).
  MLP = Linear(2d, gate_hidden) -> ReLU -> Linear(gate_hidden, d) (gate_hidden 0: one Linear). The paper's "g ·"
  is ambiguous; ``gate_dim="vector"`` (default) gates each of the d dimensions, which contains the scalar gate as
  a special case; ``gate_dim="scalar"`` makes the last Linear output one value per item.

Pre-LN option (``pre_ln=True``): x = item + position -> dropout -> blocks x + f(LN(x)) -> final LayerNorm, the usual
pre-LN arrangement; the default post-LN is MicroLens's.

Sequence architectures (``arch``): "microlens" (default, above; the paper's tables) or "sasrec", the original SASRec
of Kang & McAuley (2018) as the widely used PyTorch port implements it (docs/benchmarks.md, "The original SASRec"):
x = sqrt(d) * e + p (learned positions 1..L; padding slots get a zero position vector) -> dropout -> blocks
(``OriginalBlock``: Q/K/V/output projections with biases, causal mask only, dropout on the attention weights, FFN
d -> d -> d with ReLU and dropout after each Linear; post-LN x = LN(x + MHA(x)), x = LN(x + FFN(x)), or pre-LN with
``pre_ln``) -> a final LayerNorm, LayerNorm eps 1e-8, xavier-normal weight matrices (the port runs
``xavier_normal_`` over every parameter it can). Candidates are scored against the unscaled e.

The content vector e_v = Proj(Agg(h)) is computed from the frozen feature table [N+1, L_sel, H] that the caller has
already cut to the rows the model reads (``features.model_rows``; ``content``): ``layer`` is one row, ``mean``
averages the rows uniformly (paper section 4.3), ``learned`` weighs them with DFF's global learnable alpha (paper
Eq. 5). Layers are aggregated BEFORE the projection: for the linear projection (``proj_hidden=0``) and an affine or
no per-layer normalisation (``feature_norm`` "standardize" or "none"), Proj(sum_l a_l h_l) == sum_l a_l Proj(h_l)
at 1/L of the cost; with ``proj_hidden > 0`` or ``feature_norm="layernorm"`` the two orders differ and we aggregate
first.

The frozen table is a ``FrozenFeatures`` variable, not an ``nnx.Param``, so ``nnx.split(model, nnx.Param, ...)``
leaves it out of the trainable state (the optimizer never decays it). Dropout takes an explicit key
(``encode(..., rng=key)``): the model holds no RNG state, so a train step can be the pure function
``loss(params, batch, key)`` with ``nnx.merge`` inside ``jax.jit``.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dff_jax.features import standardize_stats

ARCHS = ("microlens", "sasrec")
# jax.random implementations the step's dropout and negatives may draw from (``model.rng_impl``): "threefry2x32"
# is jax's default (the stream every run had before the option); the RBG ones are several times cheaper on CPU.
RNG_IMPLS = ("threefry2x32", "rbg", "unsafe_rbg")
ITEM_ENCODERS = ("id", "replace", "fusion")
CONTENT_MODES = ("layer", "mean", "learned")
FEATURE_NORMS = ("none", "layernorm", "standardize")
GATE_DIMS = ("vector", "scalar")
DEDUP_MODES = ("auto", "none", "unique")
COLD_IDS = ("random", "zero")
# Initial scale of the content projection (``model.content_init``, docs/protocol.md section 11): "default" is flax's
# lecun-normal Linear; "match_id" rescales the projection so projected content rows start at the expected norm of an
# xavier-normal ID row, sqrt(2 d / (N + 1 + d)).
CONTENT_INITS = ("default", "match_id")
INIT_SAMPLE = 1024  # items whose initial projected norm sets the "match_id" scale (evenly spaced)
LN_EPS = 1e-6  # MicroLens SASRec LayerNorm eps (protocol section 4)
ORIGINAL_LN_EPS = 1e-8  # the SASRec PyTorch port's LayerNorm eps (arch="sasrec")
MASK_VALUE = -1e9  # finite, like MicroLens's additive -1e9 mask
KEYS_PER_BLOCK = 3
# arch="sasrec" user vectors (``Recommender._short_first``): rows per group and the window widths a group may run at.
USER_GROUP = 128
USER_WIDTHS = (8, 16, 32)  # dropout sites per block: attention probabilities, attention output, FFN output


def _scaled_normal(key: jax.Array, shape: tuple[int, ...], std, dtype=jnp.float32) -> jax.Array:
    """jax.random.normal(key, shape) * std with each op rounded on its own, as when run eagerly. The state is
    initialised under jit (train_state.create_train_state), where XLA would fold std into normal's own sqrt(2)
    factor and move some values by one ulp; the barrier keeps the values every run had before."""
    return jax.lax.optimization_barrier(jax.random.normal(key, shape, dtype)) * np.asarray(std, dtype)


def XAVIER_NORMAL(key: jax.Array, shape: tuple[int, int], dtype=jnp.float32) -> jax.Array:
    """torch.nn.init.xavier_normal_ (untruncated normal, fan_avg), used by MicroLens for every Linear and Embedding:
    ``nnx.initializers.variance_scaling(1.0, "fan_avg", "normal")``'s values (its f32 variance, then sqrt)."""
    return _scaled_normal(key, shape, np.sqrt(np.float32(2.0 / (shape[-2] + shape[-1]))), dtype)


class FrozenFeatures(nnx.Variable):
    """A frozen, non-trainable array (the LVLM feature table and its statistics); not an ``nnx.Param``."""


def _xavier_normal(key: jax.Array, shape: tuple[int, int]) -> jax.Array:
    # torch.nn.init.xavier_normal_ on an [rows, cols] embedding: std = sqrt(2 / (rows + cols)).
    return _scaled_normal(key, shape, math.sqrt(2.0 / (shape[0] + shape[1])))


def as_impl(key: jax.Array, impl: str) -> jax.Array:
    """``key`` as a key of the jax.random implementation ``impl`` (one of RNG_IMPLS).

    "threefry2x32" returns ``key`` itself, so the default keeps the random stream it always had. The others are
    seeded with 4 threefry words of ``key``: a deterministic function of it, so a resumed run draws the same masks.
    """
    if impl not in RNG_IMPLS:
        raise ValueError(f"model config: rng_impl must be one of {RNG_IMPLS}, got {impl!r}")
    if impl == "threefry2x32":
        return key
    return jax.random.wrap_key_data(jax.random.bits(key, (4,), jnp.uint32), impl=impl)


def dropout_keeps(key: jax.Array | None, rate: float, shapes: list[tuple[int, ...]]) -> list[jax.Array | None]:
    """Keep-masks for several dropout sites from ONE uniform draw.

    Each ``jax.random`` call inlines a full threefry hash into the XLA graph; one draw sliced into all sites
    instead of one per site cut the compile time of the train step severalfold on CPU. Returns Nones (no dropout)
    when ``key`` is None or ``rate`` is 0.
    """
    if key is None or rate <= 0.0:
        return [None] * len(shapes)
    sizes = [math.prod(shape) for shape in shapes]
    keep = jax.random.uniform(key, (sum(sizes),)) >= rate
    out, start = [], 0
    for shape, size in zip(shapes, sizes):
        out.append(keep[start : start + size].reshape(shape))
        start += size
    return out


# arch="sasrec" draws its dropout masks as 16-bit words, at most this many 32-bit words per key (the stream these
# masks have had since they were introduced; docs/benchmarks.md, "The original SASRec").
MASK_WORDS_PER_CALL = 1 << 19
MASK_LEVELS = 1 << 16
# Threefry-2x32 (Salmon et al. 2011, "Parallel random numbers: as easy as 1, 2, 3"): 20 rounds, these rotations
# alternating every 4 rounds, a key injection after every 4 rounds with the parity word below.
_THREEFRY_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_THREEFRY_PARITY = 0x1BD11BDA


def threefry_bits(key: jax.Array, n: int) -> jax.Array:
    """uint32[n], equal to ``jax.random.bits(key, (n,), jnp.uint32)`` for a threefry2x32 ``key``, with the 20 rounds
    written out.

    On CPU jax lowers threefry to a 5-iteration loop that writes the whole [n] state to memory every iteration (plus
    copies of it); written out, the hash is one elementwise fusion. For the ~1.1 M mask words of an arch="sasrec" step
    that is ~5 ms of CPU instead of ~15 (docs/benchmarks.md). jax draws the words with counter (hi, lo) = (0, index)
    and returns the xor of the two output words; so do we (checked against jax.random.bits in tests/test_models.py).
    """
    k = jax.random.key_data(key).astype(jnp.uint32)
    ks = (k[0], k[1], k[0] ^ k[1] ^ np.uint32(_THREEFRY_PARITY))
    x0 = jnp.zeros((n,), jnp.uint32) + ks[0]
    x1 = jnp.arange(n, dtype=jnp.uint32) + ks[1]
    for i in range(5):
        for r in _THREEFRY_ROTATIONS[i % 2]:
            x0 = x0 + x1
            x1 = ((x1 << np.uint32(r)) | (x1 >> np.uint32(32 - r))) ^ x0
        x0 = x0 + ks[(i + 1) % 3]
        x1 = x1 + ks[(i + 2) % 3] + np.uint32(i + 1)
    return x0 ^ x1


def _random_words(key: jax.Array, n: int) -> jax.Array:
    """``jax.random.bits(key, (n,), uint32)``, through ``threefry_bits`` for threefry keys (the same words)."""
    if str(jax.random.key_impl(key)) == "threefry2x32" and jax.config.jax_threefry_partitionable:
        return threefry_bits(key, n)
    return jax.random.bits(key, (n,), jnp.uint32)


def mask_rate(rate: float) -> float:
    """The dropout rate a 16-bit mask realises (``dropout_keeps_16``): ``rate`` rounded to a multiple of 2^-16."""
    return round(rate * MASK_LEVELS) / MASK_LEVELS


def dropout_keeps_16(key: jax.Array | None, rate: float, shapes: list[tuple[int, ...]]) -> list[jax.Array | None]:
    """Keep-masks like ``dropout_keeps`` from 16-bit uniform integers: each 32-bit word gives two decisions, and the
    words come from one key per MASK_WORDS_PER_CALL (``_random_words``). The drop probability is
    ``mask_rate(rate)`` (0.2 -> 13107 / 65536 = 0.199997); divide the kept values by 1 - mask_rate(rate)."""
    if key is None or rate <= 0.0:
        return [None] * len(shapes)
    sizes = [math.prod(shape) for shape in shapes]
    words = -(-sum(sizes) // 2)
    calls = -(-words // MASK_WORDS_PER_CALL)
    keys = jax.random.split(key, calls)
    parts = [_random_words(keys[i], min(MASK_WORDS_PER_CALL, words - i * MASK_WORDS_PER_CALL)) for i in range(calls)]
    halves = jax.lax.bitcast_convert_type(jnp.concatenate(parts), jnp.uint16).reshape(-1)
    keep = halves >= round(rate * MASK_LEVELS)
    out, start = [], 0
    for shape, size in zip(shapes, sizes):
        out.append(keep[start : start + size].reshape(shape))
        start += size
    return out


def dropout(x: jax.Array, rate: float, keep: jax.Array | None) -> jax.Array:
    """Inverted dropout with a precomputed keep-mask (``dropout_keeps``); identity when ``keep`` is None."""
    if keep is None:
        return x
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


@functools.partial(jax.jit, static_argnames="standardize", donate_argnums=0)
def fill_rows(out, block, start, mean, inv_std, *, standardize: bool = True):
    """Writes `block` at row `start` of `out` (donated), z-scored per (layer, dimension) when `standardize`; the one
    expression of the standardised table, shared by `standardized_table` and the streamed placement
    (`feature_cache.place`), so both give the same bits."""
    if standardize:
        z = (block.astype(jnp.float32) - mean) * inv_std
        # A rare large value in a near-constant dimension gives z beyond float16's 65504: clipped, not an Inf
        # table (bf16 and f32 hold it; for them the clip changes nothing).
        limit = float(jnp.finfo(out.dtype).max)
        block = jnp.clip(z, -limit, limit).astype(out.dtype)
    return jax.lax.dynamic_update_slice_in_dim(out, block, start, axis=0)


def standardized_table(table: np.ndarray, max_values: int = 1 << 26) -> jax.Array:
    """The table z-scored per (layer, dimension) with `standardize_stats`, as a device array in its stored dtype.

    Filled in place on the device, one chunk of items at a time (at most ``max_values`` float32 values in flight),
    so neither host nor device ever holds a second whole copy or a float32 widening of a bf16/f16 table. Row 0
    (padding) is transformed like the others; the model zeroes padding items' embeddings anyway. The fill is one
    module-level jit taking the statistics as arguments, so every model built at the same shapes reuses it.
    """
    mean, inv_std = (jnp.asarray(a) for a in standardize_stats(table))
    chunk = max(1, max_values // int(np.prod(table.shape[1:])))
    out = jnp.zeros(table.shape, table.dtype)
    for start in range(0, table.shape[0], chunk):
        out = fill_rows(out, np.asarray(table[start : start + chunk]), np.int32(start), mean, inv_std)
    return out


class ContentEncoder(nnx.Module):
    """e_v = Proj(Norm(sum_l alpha_l h_l)) from the frozen feature table (paper Eq. 5 + projection head).

    ``feature_norm`` (default "standardize"): LVLM hidden states differ in scale by orders of magnitude across
    layers (deep layers and a few "massive activation" dimensions dominate), so a uniform mean or a learned alpha
    over raw rows is really a weighting by norm. "standardize" z-scores every (layer, dimension) with statistics
    taken once from the table at build time. It is an affine map of each row, so with a single layer it changes
    nothing the linear projection could not absorb (faithful to the paper), while with several layers it makes the
    uniform mean / alpha weigh layers by their information rather than their scale (robust). The table is stored
    standardised (in its own dtype), so a step only computes sum_l alpha_l z_l. "layernorm" normalises the
    aggregated vector per item (learned affine); "none" is the paper's raw formula.

    ``alpha_softmax`` (default True): alpha = softmax(w), w initialised to 0, i.e. uniform 1/L (Eq. 5 "initialized
    uniformly"). The softmax keeps alpha a convex combination, so the aggregated feature keeps its scale whatever the
    weights learn and the projection sees a stable input. False uses raw weights initialised to 1/L.
    """

    def __init__(
        self,
        table: np.ndarray,
        *,
        embed_dim: int,
        content: str,
        feature_norm: str,
        alpha_softmax: bool,
        proj_hidden: int,
        rngs: nnx.Rngs,
        init_norm: float | None = None,
    ):
        if content not in CONTENT_MODES:
            raise ValueError(f"model config: content must be one of {CONTENT_MODES}, got {content!r}")
        if feature_norm not in FEATURE_NORMS:
            raise ValueError(f"model config: feature_norm must be one of {FEATURE_NORMS}, got {feature_norm!r}")
        self.content, self.feature_norm, self.alpha_softmax = content, feature_norm, bool(alpha_softmax)
        self.num_layers, hidden = int(table.shape[1]), int(table.shape[2])
        # The stored dtype is kept (bf16/f16/f32); rows are cast to float32 on gather. A jax.Array is a table the
        # caller has already placed and normalised (feature_cache.load: sharded, z-scored per shard when
        # feature_norm is "standardize"), used as it is so no unsharded copy is ever made.
        if isinstance(table, jax.Array):
            self.table = FrozenFeatures(table)
        else:
            self.table = FrozenFeatures(
                standardized_table(table) if feature_norm == "standardize" else jnp.asarray(table)
            )
        if content == "learned":
            init = 0.0 if self.alpha_softmax else 1.0 / self.num_layers
            self.layer_logits = nnx.Param(jnp.full((self.num_layers,), init, jnp.float32))
        if feature_norm == "layernorm":
            self.feature_ln = nnx.LayerNorm(hidden, epsilon=LN_EPS, rngs=rngs)
        if proj_hidden > 0:  # Linear-GELU-Linear head
            self.proj = nnx.Linear(hidden, proj_hidden, rngs=rngs)
            self.proj_out = nnx.Linear(proj_hidden, embed_dim, rngs=rngs)
        else:
            self.proj = nnx.Linear(hidden, embed_dim, rngs=rngs)
            self.proj_out = None
        if init_norm is not None:
            # The last Linear has a zero bias at init, so scaling its kernel scales every projected row: measured on
            # up to INIT_SAMPLE evenly spaced real items, the mean row norm becomes init_norm. Array arithmetic, no
            # host round trip: the state is initialised under jit (train_state.create_train_state), the table sharded.
            rows = np.unique(np.linspace(1, table.shape[0] - 1, min(INIT_SAMPLE, table.shape[0] - 1)).astype(int))
            norm = jnp.mean(jnp.linalg.norm(self(jnp.asarray(rows)), axis=-1))
            last = self.proj_out if self.proj_out is not None else self.proj
            scale = jnp.where(norm > 0, init_norm / jnp.where(norm > 0, norm, 1.0), 1.0)
            last.kernel.value = jax.lax.optimization_barrier(last.kernel[...]) * scale.astype(last.kernel.dtype)

    def weights(self) -> jax.Array:
        """alpha [L_sel]: the layer weights of Eq. 5 (uniform for "mean", [1.] for "layer")."""
        if self.content == "learned":
            w = self.layer_logits[...]
            return jax.nn.softmax(w) if self.alpha_softmax else w
        return jnp.full((self.num_layers,), 1.0 / self.num_layers, jnp.float32)

    def aggregate(self, items: jax.Array) -> jax.Array:
        """sum_l alpha_l h_l(items) (Eq. 5; over standardised rows if configured): [...] -> [..., H] float32."""
        rows = self.table[...][items].astype(jnp.float32)  # [..., L, H]
        # The table is standardised once at build time rather than per step with (layer, dim) weights
        # alpha_l / s_l: the gradient of alpha is then one reduction of rows * g to L numbers, where the folded form
        # reduced over the batch's slots for every (layer, dim), several times slower (docs/benchmarks.md).
        return jnp.sum(rows * self.weights()[:, None], axis=-2)

    def __call__(self, items: jax.Array) -> jax.Array:
        x = self.aggregate(items)
        if self.feature_norm == "layernorm":
            x = self.feature_ln(x)
        x = self.proj(x.astype(self.proj.kernel.dtype))  # bf16 compute: the big projection runs in bf16 too
        if self.proj_out is not None:
            x = self.proj_out(jax.nn.gelu(x))
        return x


class Block(nnx.Module):
    """One Transformer block as in MicroLens ``modules.py``: bias-free Q/K/V/output projections, scaled dot-product
    attention with dropout on the probabilities, dropout after the output projection; FFN Linear(d, 4d) -> ReLU ->
    Linear(4d, d) -> dropout. Post-LN (MicroLens): LN(x + sublayer(x)); pre-LN option: x + sublayer(LN(x)).
    Linear kernels are xavier-normal with zero bias, like MicroLens ``User_Encoder_SASRec._init_weights``."""

    def __init__(self, d: int, num_heads: int, rate: float, pre_ln: bool, *, rngs: nnx.Rngs):
        if d % num_heads:
            raise ValueError(f"model config: embed_dim {d} is not divisible by num_heads {num_heads}")
        self.num_heads, self.rate, self.pre_ln = num_heads, rate, pre_ln
        init = XAVIER_NORMAL
        self.query = nnx.Linear(d, d, use_bias=False, kernel_init=init, rngs=rngs)
        self.key = nnx.Linear(d, d, use_bias=False, kernel_init=init, rngs=rngs)
        self.value = nnx.Linear(d, d, use_bias=False, kernel_init=init, rngs=rngs)
        self.out = nnx.Linear(d, d, use_bias=False, kernel_init=init, rngs=rngs)
        self.attn_ln = nnx.LayerNorm(d, epsilon=LN_EPS, rngs=rngs)
        self.ffn_in = nnx.Linear(d, 4 * d, kernel_init=init, rngs=rngs)
        self.ffn_out = nnx.Linear(4 * d, d, kernel_init=init, rngs=rngs)
        self.ffn_ln = nnx.LayerNorm(d, epsilon=LN_EPS, rngs=rngs)

    def attention(self, x: jax.Array, allowed: jax.Array, keys: list) -> jax.Array:
        b, length, d = x.shape
        h = self.num_heads
        q = self.query(x).reshape(b, length, h, d // h)
        k = self.key(x).reshape(b, length, h, d // h)
        v = self.value(x).reshape(b, length, h, d // h)
        # Hand-written einsum attention rather than jax.nn.dot_product_attention: the two train steps timed the same
        # on CPU, and only this form has MicroLens's dropout on the attention probabilities.
        scores = jnp.einsum("bqhc,bkhc->bhqk", q, k) / math.sqrt(d // h)
        scores = jnp.where(allowed[:, None], scores, MASK_VALUE)
        probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(v.dtype)  # float32 softmax under bf16
        probs = dropout(probs, self.rate, keys[0])
        context = jnp.einsum("bhqk,bkhc->bqhc", probs, v).reshape(b, length, d)
        return dropout(self.out(context), self.rate, keys[1])

    def feed_forward(self, x: jax.Array, keys: list) -> jax.Array:
        return dropout(self.ffn_out(jax.nn.relu(self.ffn_in(x))), self.rate, keys[2])

    def __call__(self, x: jax.Array, allowed: jax.Array, keys: list) -> jax.Array:
        if self.pre_ln:
            x = x + self.attention(self.attn_ln(x), allowed, keys)
            return x + self.feed_forward(self.ffn_ln(x), keys)
        x = self.attn_ln(x + self.attention(x, allowed, keys))
        return self.ffn_ln(x + self.feed_forward(x, keys))


def _normal(std: float):
    return lambda key, shape, dtype=jnp.float32: _scaled_normal(key, shape, std, dtype)  # nnx.initializers.normal


def _torch_bias(fan_in: int):
    """torch's default Linear/Conv1d bias init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)): the port's xavier pass skips
    1-D tensors, so its FFN biases keep it."""
    bound = 1.0 / math.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


class OriginalBlock(nnx.Module):
    """One block of the original SASRec (Kang & McAuley 2018) as the PyTorch port builds it (arch="sasrec").

    Attention is ``torch.nn.MultiheadAttention``: Q/K/V and output projections with biases (zero-initialised),
    dropout on the attention weights only, no dropout on its output. Its Q/K/V weights are one packed [3d, d]
    matrix, so xavier-normal gives them std sqrt(2 / (d + 3d)); the output projection's is sqrt(2 / (d + d)).
    The FFN is two kernel-1 Conv1d d -> d (a Linear each) with dropout after each and ReLU between. Post-LN:
    x = LN(x + MHA(x)); x = LN(x + FFN(x)); pre-LN: x = x + MHA(LN(x)); x = x + FFN(LN(x)). LayerNorm eps 1e-8.
    """

    def __init__(self, d: int, num_heads: int, rate: float, pre_ln: bool, *, rngs: nnx.Rngs):
        if d % num_heads:
            raise ValueError(f"model config: embed_dim {d} is not divisible by num_heads {num_heads}")
        self.num_heads, self.rate, self.pre_ln = num_heads, rate, pre_ln
        packed, square = _normal(math.sqrt(2.0 / (4 * d))), _normal(math.sqrt(1.0 / d))
        zeros = nnx.initializers.zeros_init()
        self.query = nnx.Linear(d, d, kernel_init=packed, bias_init=zeros, rngs=rngs)
        self.key = nnx.Linear(d, d, kernel_init=packed, bias_init=zeros, rngs=rngs)
        self.value = nnx.Linear(d, d, kernel_init=packed, bias_init=zeros, rngs=rngs)
        self.out = nnx.Linear(d, d, kernel_init=square, bias_init=zeros, rngs=rngs)
        self.attn_ln = nnx.LayerNorm(d, epsilon=ORIGINAL_LN_EPS, rngs=rngs)
        self.ffn_in = nnx.Linear(d, d, kernel_init=square, bias_init=_torch_bias(d), rngs=rngs)
        self.ffn_out = nnx.Linear(d, d, kernel_init=square, bias_init=_torch_bias(d), rngs=rngs)
        self.ffn_ln = nnx.LayerNorm(d, epsilon=ORIGINAL_LN_EPS, rngs=rngs)

    def attention(
        self, x: jax.Array, allowed: jax.Array, keep: jax.Array | None, queries: int = 0, key_bias=None
    ) -> jax.Array:
        """MHA over ``x`` [B, L, d]; ``queries`` > 0 computes only the last that many query positions; ``key_bias``
        [L] is added to every query's logits (``SASRec._original``'s stand-in column for leading padding)."""
        b, length, d = x.shape
        h = self.num_heads
        xq = x[:, -queries:] if queries else x
        q = self.query(xq).reshape(b, xq.shape[1], h, d // h)
        k = self.key(x).reshape(b, length, h, d // h)
        v = self.value(x).reshape(b, length, h, d // h)
        scores = jnp.einsum("bqhc,bkhc->bhqk", q, k) / math.sqrt(d // h)
        scores = jnp.where(allowed[:, None], scores, MASK_VALUE)
        if key_bias is not None:
            scores = scores + key_bias
        probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(v.dtype)
        probs = dropout(probs, self.rate, keep)
        return self.out(jnp.einsum("bhqk,bkhc->bqhc", probs, v).reshape(b, xq.shape[1], d))

    def feed_forward(self, x: jax.Array, keys: list) -> jax.Array:
        # relu(dropout(a)) == dropout(relu(a)): the port's order (dropout1 before the ReLU) changes nothing.
        return dropout(self.ffn_out(jax.nn.relu(dropout(self.ffn_in(x), self.rate, keys[1]))), self.rate, keys[2])

    def __call__(self, x: jax.Array, allowed: jax.Array, keys: list, key_bias=None) -> jax.Array:
        if self.pre_ln:
            x = x + self.attention(self.attn_ln(x), allowed, keys[0], key_bias=key_bias)
            return x + self.feed_forward(self.ffn_ln(x), keys)
        x = self.attn_ln(x + self.attention(x, allowed, keys[0], key_bias=key_bias))
        return self.ffn_ln(x + self.feed_forward(x, keys))

    def last(self, x: jax.Array, key_bias=None) -> jax.Array:
        """The block's output at the last position only, [B, 1, d], without dropout: a user vector needs nothing
        else from the last block, and the last query sees every key under the causal mask."""
        allowed = jnp.ones((1, 1, x.shape[1]), bool)
        none = [None, None, None]
        if self.pre_ln:
            y = x[:, -1:] + self.attention(self.attn_ln(x), allowed, None, queries=1, key_bias=key_bias)
            return y + self.feed_forward(self.ffn_ln(y), none)
        y = self.attn_ln(x[:, -1:] + self.attention(x, allowed, None, queries=1, key_bias=key_bias))
        return self.ffn_ln(y + self.feed_forward(y, none))


class ItemEncoder(nnx.Module):
    """Item index -> e (``item_encoder`` "id", "replace" or "fusion"; module docstring), padding 0 -> zeros."""

    def __init__(
        self,
        num_items: int,
        table: np.ndarray | None,
        *,
        item_encoder: str,
        embed_dim: int,
        content: str,
        feature_norm: str,
        alpha_softmax: bool,
        proj_hidden: int,
        gate_hidden: int,
        gate_dim: str,
        cold_id: str,
        dedup: str,
        train_counts: np.ndarray | None,
        rngs: nnx.Rngs,
        content_init: str = "default",
    ):
        if item_encoder not in ITEM_ENCODERS:
            raise ValueError(f"model config: item_encoder must be one of {ITEM_ENCODERS}, got {item_encoder!r}")
        if gate_dim not in GATE_DIMS:
            raise ValueError(f"model config: gate_dim must be one of {GATE_DIMS}, got {gate_dim!r}")
        if dedup not in DEDUP_MODES:
            raise ValueError(f"model config: dedup must be one of {DEDUP_MODES}, got {dedup!r}")
        if cold_id not in COLD_IDS:
            raise ValueError(f"model config: cold_id must be one of {COLD_IDS}, got {cold_id!r}")
        if content_init not in CONTENT_INITS:
            raise ValueError(f"model config: content_init must be one of {CONTENT_INITS}, got {content_init!r}")
        self.kind, self.dedup = item_encoder, dedup
        self.num_items, self.embed_dim = int(num_items), int(embed_dim)
        d = self.embed_dim
        if item_encoder != "replace":  # the replacement model has no ID table at all (paper section 4.1)
            ids = _xavier_normal(rngs.params(), (self.num_items + 1, d))
            # padding_idx=0: zero row, and the lookup multiplies by (item != 0) so it never gets a gradient. (MicroLens
            # re-initialises the whole table with xavier_normal_, leaving row 0 random but frozen; a scored position
            # never attends to padding keys, so the two are equivalent.)
            ids = ids.at[0].set(0.0)
            if cold_id == "zero":
                # Items absent from training never get a gradient, so their ID rows would stay random noise forever
                # and drown their content path at test time; zero rows make a fused cold item content-only
                # (g*0 + (1-g)*e_v).
                if train_counts is None:
                    raise ValueError("model config: cold_id='zero' needs the items' train counts (train_counts=)")
                ids = jnp.where(jnp.asarray(train_counts == 0)[:, None], 0.0, ids)
            self.item_id = nnx.Param(ids)
        if item_encoder == "id":
            self.content = None
        else:
            self.content = ContentEncoder(
                table,
                embed_dim=d,
                content=content,
                feature_norm=feature_norm,
                alpha_softmax=alpha_softmax,
                proj_hidden=proj_hidden,
                rngs=rngs,
                init_norm=self._id_norm() if content_init == "match_id" else None,
            )
        if item_encoder == "fusion":
            gate_out = d if gate_dim == "vector" else 1
            if gate_hidden > 0:  # Eq. 3/6 MLP: Linear(2d, hidden) -> ReLU -> Linear(hidden, d or 1)
                self.gate_in = nnx.Linear(2 * d, gate_hidden, rngs=rngs)
                self.gate_out = nnx.Linear(gate_hidden, gate_out, rngs=rngs)
            else:
                self.gate_in = None
                self.gate_out = nnx.Linear(2 * d, gate_out, rngs=rngs)

    def _sample(self) -> jax.Array:
        return jnp.asarray(np.unique(np.linspace(1, self.num_items, min(INIT_SAMPLE, self.num_items)).astype(int)))

    def _id_norm(self) -> float | jax.Array:
        """The mean norm of the ID rows of `_sample` (a scalar array); without an ID table (replace) what an
        xavier-normal one of these shapes would have (``_xavier_normal``: std sqrt(2 / (N + 1 + d)) per entry)."""
        if self.kind == "replace":
            return math.sqrt(2.0 * self.embed_dim / (self.num_items + 1 + self.embed_dim))
        return jnp.mean(jnp.linalg.norm(self.item_id[...][self._sample()], axis=-1))

    def row_norms(self) -> dict[str, float]:
        """Mean L2 norm of the ID rows and of the projected content rows ("id", "content", where present) over up
        to INIT_SAMPLE evenly spaced items: the two scales the gate mixes (``content_init``, docs/protocol.md 11)."""
        items = self._sample()
        out = {}
        if self.kind != "replace":
            out["id"] = float(self._id_norm())
        if self.content is not None:
            out["content"] = float(jnp.mean(jnp.linalg.norm(self.content(items), axis=-1)))
        return out

    def gate(self, e_id: jax.Array, e_v: jax.Array) -> jax.Array:
        """g of Eq. 3/6: the weight on the ID embedding, [..., d] (vector gate) or [..., 1] (scalar gate)."""
        x = jnp.concatenate([e_id, e_v], axis=-1)
        if self.gate_in is not None:
            x = jax.nn.relu(self.gate_in(x))
        return jax.nn.sigmoid(self.gate_out(x))

    def encode(self, items: jax.Array) -> jax.Array:
        """e for every slot of ``items`` (no padding mask, no deduplication)."""
        if self.kind == "id":
            return self.item_id[...][items]
        e_v = self.content(items)
        if self.kind == "replace":
            return e_v
        e_id = self.item_id[...][items]
        g = self.gate(e_id, e_v)
        return g * e_id + (1.0 - g) * e_v  # Eq. 4 / Eq. 7

    def __call__(self, items: jax.Array) -> jax.Array:
        """Item representations e for any int array ``items`` [...] -> [..., d] (padding 0 -> zero vector).

        With a content encoder, ``dedup`` decides how the batch is embedded: "unique" encodes each distinct item
        once (jnp.unique with a static size of min(items.size, N+1)) and gathers back; "none" encodes every slot;
        "auto" (default) uses "unique" only when it actually shrinks the work, i.e. when N+1 < items.size
        (static shapes under jit mean a unique set padded to items.size costs as much as encoding every slot, and
        on CPU the sort and gathers cost more than they save). The ``id`` encoder is a plain gather.
        """
        items = jnp.asarray(items)
        slots = items.size
        use_unique = self.kind != "id" and (
            self.dedup == "unique" or (self.dedup == "auto" and self.num_items + 1 < slots)
        )
        if use_unique:
            flat = items.reshape(-1)
            uniq, inverse = jnp.unique(flat, size=min(slots, self.num_items + 1), fill_value=0, return_inverse=True)
            emb = self.encode(uniq)[inverse.reshape(-1)].reshape(items.shape + (self.embed_dim,))
        else:
            emb = self.encode(items)
        # padding_idx=0: row 0 is zero and gets no gradient, whatever the encoder makes of it.
        return emb * (items != 0)[..., None].astype(emb.dtype)

    def all_items(self, chunk_size: int | None = None, sharding=None) -> jax.Array:
        """[N+1, d] representations of every item (row 0 = zeros), for full ranking and full softmax.

        Content encoders run in chunks of ``chunk_size`` items (``jax.lax.map``) so the gathered feature rows stay
        bounded (evaluation passes ``eval.chunk_size``; default: about 64 M float32 values per chunk). ``sharding``
        lays out each chunk's [chunk, d] embeddings as it is made (evaluation: ``parallel.ranking_sharding``), so
        the stacked table is never whole on a device.
        """
        n = self.num_items + 1
        if self.kind == "id":
            return self(jnp.arange(n))
        if chunk_size is None:
            per_item = self.content.num_layers * int(self.content.table.shape[-1])
            chunk_size = max(1, (1 << 26) // per_item)
        chunk_size = min(chunk_size, n)
        chunks = -(-n // chunk_size)
        ids = jnp.arange(chunks * chunk_size).reshape(chunks, chunk_size)
        ids = jnp.where(ids < n, ids, 0)

        def encode(chunk):
            e = self.encode(chunk)
            return e if sharding is None else jax.lax.with_sharding_constraint(e, sharding)

        out = jax.lax.map(encode, ids).reshape(chunks * chunk_size, self.embed_dim)[:n]
        return out * (jnp.arange(n) != 0)[:, None].astype(out.dtype)


class SASRec(nnx.Module):
    """The sequence encoder: item embeddings [B, L, d] + positions -> Transformer blocks -> outputs [B, L, d]."""

    def __init__(
        self,
        *,
        arch: str,
        embed_dim: int,
        max_seq_len: int,
        num_blocks: int,
        num_heads: int,
        dropout: float,
        pre_ln: bool,
        rngs: nnx.Rngs,
    ):
        if arch not in ARCHS:
            raise ValueError(f"model config: arch must be one of {ARCHS}, got {arch!r}")
        d = int(embed_dim)
        self.arch = arch
        self.rate, self.pre_ln, self.num_heads = float(dropout), bool(pre_ln), int(num_heads)
        if arch == "microlens":
            self.position = nnx.Param(_xavier_normal(rngs.params(), (int(max_seq_len), d)))
            # Post-LN (MicroLens): LayerNorm(item + position) before the blocks. Pre-LN: a final LayerNorm after them.
            self.seq_ln = nnx.LayerNorm(d, epsilon=LN_EPS, rngs=rngs)
            block = Block
        else:
            # The port's position table is [L+1, d] with row 0 (padding) zeroed; we keep rows 1..L, drawn with the
            # xavier std of the whole [L+1, d] table. seq_ln is its final LayerNorm (after the blocks, both LN modes).
            std = math.sqrt(2.0 / (int(max_seq_len) + 1 + d))
            self.position = nnx.Param(_scaled_normal(rngs.params(), (int(max_seq_len), d), std))
            self.seq_ln = nnx.LayerNorm(d, epsilon=ORIGINAL_LN_EPS, rngs=rngs)
            block = OriginalBlock
        # arch="sasrec" draws 16-bit dropout masks (dropout_keeps_16): kept values are scaled by the rate they realise.
        rate = self.rate if arch == "microlens" else mask_rate(self.rate)
        self.blocks = nnx.List([block(d, self.num_heads, rate, self.pre_ln, rngs=rngs) for _ in range(num_blocks)])

    def __call__(self, x: jax.Array, inputs: jax.Array, *, deterministic: bool, rng: jax.Array | None) -> jax.Array:
        """Outputs per position for item embeddings ``x`` [B, L, d] of the left-padded ``inputs`` [B, L]."""
        if not deterministic and rng is None and self.rate > 0:
            raise ValueError("encode: deterministic=False needs a dropout key rng=")
        b, length, d = x.shape
        h = self.num_heads
        # Dropout sites: embeddings, then per block attention probabilities, attention output, FFN output.
        shapes = [(b, length, d)] + [(b, h, length, length), (b, length, d), (b, length, d)] * len(self.blocks)
        keys = (dropout_keeps_16 if self.arch == "sasrec" else dropout_keeps)(
            None if deterministic else rng, self.rate, shapes
        )
        if self.arch == "sasrec":
            return self._original(x, inputs, keys)
        x = x + self.position[...][:length]
        if not self.pre_ln:
            x = self.seq_ln(x)
        x = dropout(x, self.rate, keys[0])
        # Causal + key padding mask. The diagonal is always allowed, so left-padding query rows (which attend to
        # nothing in MicroLens) see only themselves: no NaN and no leak from later positions. Their outputs are
        # never scored (no target there).
        valid = inputs != 0
        causal = jnp.tril(jnp.ones((length, length), bool))
        allowed = causal[None] & (valid[:, None, :] | jnp.eye(length, dtype=bool)[None])
        for i, block in enumerate(self.blocks):
            x = block(x, allowed, keys[1 + KEYS_PER_BLOCK * i : 1 + KEYS_PER_BLOCK * (i + 1)])
        if self.pre_ln:
            x = self.seq_ln(x)
        return x

    def last_output(self, x: jax.Array, inputs: jax.Array, pad_slots: int = 0) -> jax.Array:
        """[B, d]: the deterministic output at the last position. For arch="sasrec" the last block runs for that
        position only (``OriginalBlock.last``: the same values at about 1/3 fewer FLOPs with 2 blocks), and
        ``pad_slots`` > 0 says that ``x``/``inputs`` are the right end of a max_seq_len window whose first
        ``pad_slots`` slots are padding (``_original``)."""
        if self.arch == "microlens":
            return self(x, inputs, deterministic=True, rng=None)[:, -1]
        keys = [None] * (1 + KEYS_PER_BLOCK * len(self.blocks))
        return self._original(x, inputs, keys, last_only=True, pad_slots=pad_slots)[:, -1]

    def _original(
        self, x: jax.Array, inputs: jax.Array, keys: list, last_only: bool = False, pad_slots: int = 0
    ) -> jax.Array:
        """arch="sasrec" (module docstring): the port's ``log2feats``.

        ``pad_slots`` > 0 (no dropout): the W columns given are the right end of a window of W + pad_slots slots
        whose first pad_slots are padding. Without dropout every padding slot carries the same state through every
        block (it sees only padding: the same zero input, the same keys), so one prepended padding column whose
        attention logit gets + log(pad_slots) stands exactly for all of them, and a user with a short history costs
        W + 1 positions instead of max_seq_len (``Recommender.user_embeddings``).
        """
        length, d = x.shape[1], x.shape[2]
        key_bias, offset = None, 0
        if pad_slots:
            if any(k is not None for k in keys):
                raise ValueError("SASRec: pad_slots needs deterministic outputs (padding slots differ under dropout)")
            x = jnp.concatenate([jnp.zeros_like(x[:, :1]), x], axis=1)
            inputs = jnp.concatenate([jnp.zeros_like(inputs[:, :1]), inputs], axis=1)
            offset, length = pad_slots - 1, length + 1  # extended column c is window column c + pad_slots - 1
            key_bias = jnp.zeros((length,), x.dtype).at[0].set(math.log(pad_slots))
        valid = (inputs != 0)[..., None]
        # Column j holds position j + 1 (positions count from the left edge of the padded row, as in the port);
        # padding slots get the zero position row.
        positions = self.position[...][offset : offset + length].astype(x.dtype)
        x = x * math.sqrt(d) + jnp.where(valid, positions, 0)
        x = dropout(x, mask_rate(self.rate), keys[0])
        # Causal mask only: as in the port, real positions also attend to the (padding) slots before them.
        allowed = jnp.tril(jnp.ones((length, length), bool))[None]
        blocks = list(self.blocks)
        full = blocks[:-1] if last_only and blocks else blocks
        for i, block in enumerate(full):
            x = block(x, allowed, keys[1 + KEYS_PER_BLOCK * i : 1 + KEYS_PER_BLOCK * (i + 1)], key_bias=key_bias)
        if last_only:
            x = blocks[-1].last(x, key_bias=key_bias) if blocks else x[:, -1:]
        elif pad_slots:
            x = x[:, 1:]
        return self.seq_ln(x)


class Recommender(nnx.Module):
    """SASRec over fused item embeddings: ``Recommender(num_items, table, **config.model, train_counts=, rngs=)``.

    Args:
        num_items: N; item indices are 1..N, 0 is padding.
        table: the frozen features [N+1, L_sel, H] (numpy, bf16/f16/f32), already cut to the rows the model reads
            (``features.model_rows`` of ``content``/``layer``/``layers``); None for the ``id`` encoder. A jax.Array
            is taken as already placed and normalised (``feature_cache.load``), numpy is standardised here.
        layer, layers: which stored rows ``table`` holds (config.model); checked against its width here, so a table
            that was not cut to them cannot slip through.
        arch: the sequence architecture, "microlens" or "sasrec" (module docstring).
        rng_impl: the jax.random implementation of the training randomness (``as_impl``; RNG_IMPLS).
        train_counts: [N+1] train interactions per item (``data.Dataset.item_counts``); needed by cold_id="zero".
        other keywords: the ``config.model`` fields (dff_jax/defaults.py), used as the module docstring says.
        rngs: parameter init keys.
    """

    def __init__(
        self,
        num_items: int,
        table: np.ndarray | None = None,
        *,
        embed_dim: int,
        num_blocks: int,
        num_heads: int,
        dropout: float,
        pre_ln: bool,
        max_seq_len: int,
        item_encoder: str,
        content: str,
        layer: int,
        layers: tuple[int, ...],
        alpha_softmax: bool,
        gate_hidden: int,
        gate_dim: str,
        proj_hidden: int,
        feature_norm: str,
        cold_id: str,
        dedup: str,
        arch: str,
        rng_impl: str,
        content_init: str = "default",
        train_counts: np.ndarray | None = None,
        rngs: nnx.Rngs,
    ):
        if rng_impl not in RNG_IMPLS:
            raise ValueError(f"model config: rng_impl must be one of {RNG_IMPLS}, got {rng_impl!r}")
        if item_encoder != "id":
            _check_table(table, num_items, content, layer, layers)
        self.items = ItemEncoder(
            num_items,
            None if item_encoder == "id" else table if isinstance(table, jax.Array) else np.asarray(table),
            item_encoder=item_encoder,
            embed_dim=embed_dim,
            content=content,
            feature_norm=feature_norm,
            alpha_softmax=alpha_softmax,
            proj_hidden=proj_hidden,
            gate_hidden=gate_hidden,
            gate_dim=gate_dim,
            cold_id=cold_id,
            dedup=dedup,
            train_counts=train_counts,
            rngs=rngs,
            content_init=content_init,
        )
        self.sasrec = SASRec(
            arch=arch,
            embed_dim=embed_dim,
            max_seq_len=max_seq_len,
            num_blocks=num_blocks,
            num_heads=num_heads,
            dropout=dropout,
            pre_ln=pre_ln,
            rngs=rngs,
        )
        self.num_items, self.embed_dim = int(num_items), int(embed_dim)
        self.rng_impl = rng_impl

    def item_embeddings(self, items: jax.Array) -> jax.Array:
        """[...] item indices -> [..., d] (``ItemEncoder.__call__``)."""
        return self.items(items)

    def all_item_embeddings(self, chunk_size: int | None = None, sharding=None) -> jax.Array:
        """[N+1, d] for every item (``ItemEncoder.all_items``)."""
        return self.items.all_items(chunk_size, sharding)

    def encode(
        self,
        inputs: jax.Array,
        *,
        deterministic: bool,
        rng: jax.Array | None = None,
        input_embs: jax.Array | None = None,
    ) -> jax.Array:
        """SASRec outputs per position.

        Args:
            inputs: [B, L] int item indices, left padded with 0 (L <= max_seq_len; positions are 0..L-1).
            deterministic: no dropout when True.
            rng: dropout key, required when ``deterministic`` is False.
            input_embs: optional precomputed ``item_embeddings(inputs)`` [B, L, d] (lets the loss embed the batch's
                items once for both the inputs and the candidates).

        Returns:
            [B, L, d].
        """
        x = self.items(inputs) if input_embs is None else input_embs
        return self.sasrec(x, inputs, deterministic=deterministic, rng=rng)

    def user_embeddings(self, inputs: jax.Array) -> jax.Array:
        """[B, L] -> [B, d]: the deterministic output at the last position (left padding puts the newest item there)."""
        if self.sasrec.arch == "microlens":
            return self.encode(inputs, deterministic=True)[:, -1]
        return self._short_first(inputs)

    def _short_first(self, inputs: jax.Array) -> jax.Array:
        """arch="sasrec" user vectors at the cost of the histories' lengths rather than max_seq_len.

        The rows are sorted by history length and cut into groups of USER_GROUP; each group runs at the narrowest
        of USER_WIDTHS (or L) that holds its longest history, with the leading padding folded into one column
        (``SASRec._original``'s ``pad_slots``), chosen on the device by ``lax.switch`` so one program serves every
        batch. With histories of ~9 items and L = 50 most groups run at width 16 instead of 50.
        """
        b, length = inputs.shape
        group = USER_GROUP if b % USER_GROUP == 0 else b
        widths = [w for w in USER_WIDTHS if w < length] + [length]
        lengths = jnp.sum(inputs != 0, axis=1)
        order = jnp.argsort(lengths)
        grouped = inputs[order].reshape(b // group, group, length)
        need = lengths[order].reshape(b // group, group).max(axis=1)
        pick = jnp.searchsorted(jnp.asarray(widths), need)

        def branch(width):
            def run(rows):
                cut = rows[:, length - width :]
                return self.sasrec.last_output(self.items(cut), cut, pad_slots=length - width)

            return run

        branches = [branch(w) for w in widths]
        out = jax.lax.map(lambda args: jax.lax.switch(args[1], branches, args[0]), (grouped, pick))
        out = out.reshape(b, -1)
        return jnp.zeros_like(out).at[order].set(out)

    def gate_values(self, items: jax.Array, *, reduce: bool = True) -> jax.Array:
        """Fusion gate g of Eq. 6 (weight on the ID embedding) for ``items`` [...].

        Returns [..., 1]: the scalar gate, or for the default vector gate its mean over the d dimensions
        (``reduce=False`` returns the full [..., d] vector gate).
        """
        if self.items.kind != "fusion":
            raise ValueError(f"gate_values: the model's item_encoder is {self.items.kind!r}, not 'fusion'")
        g = self.items.gate(self.items.item_id[...][items], self.items.content(items))
        return g.mean(axis=-1, keepdims=True) if reduce else g

    def layer_weights(self) -> jax.Array:
        """alpha [L_sel] of Eq. 5 (learned), uniform for content="mean", [1.] for content="layer"."""
        if self.items.content is None:
            raise ValueError("layer_weights: the 'id' item encoder uses no content features")
        return self.items.content.weights()


def _check_table(table, num_items: int, content: str, layer: int, layers: tuple[int, ...]) -> None:
    """The feature table must be [N+1, rows the model reads, H]: cut by features.model_rows, not the whole set."""
    if table is None:
        raise ValueError("Recommender: a content item encoder needs a feature table, got None")
    if getattr(table, "ndim", None) != 3:
        raise ValueError(
            f"Recommender: features must be an array [N+1, layers, hidden], got {getattr(table, 'shape', type(table))}"
        )
    if table.shape[0] != num_items + 1:
        raise ValueError(
            f"Recommender: feature table has {table.shape[0]} rows, expected num_items + 1 = {num_items + 1}"
        )
    expected = 1 if content == "layer" else (len(layers) or None)
    if expected is not None and table.shape[1] != expected:
        raise ValueError(
            f"Recommender: content={content!r} (layer={layer}, layers={tuple(layers)}) reads {expected} stored row(s) "
            f"but the table holds {table.shape[1]}; cut it with features.model_rows first"
        )
