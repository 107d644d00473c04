"""Every config field, declared once, with the paper's defaults (section 6.2) and MicroLens's (docs/protocol.md 4).

Each experiment file in `configs/` starts from `base_config()` and changes only what differs; no module reads a field
that is not declared here and none keeps a default of its own, so what `config.json` of a run shows is what ran.
The modules take the fields as explicit arguments: `models.Recommender(num_items, table, **config.model, ...)`,
`losses.compute_loss(..., **config.loss)`, `train.make_optimizer(**config.optim)`. `apply_variant` maps the study's
variants onto the model fields.
"""

import itertools
import math

import ml_collections

# The study's item-encoder variants (paper sections 4-5): name -> (item_encoder, content, layer).
VARIANTS = {
    "id": ("id", "layer", -1),  # ID embedding only (IDRec SASRec)
    "replace": ("replace", "layer", -1),  # last decoder layer replaces the ID (Table 1 "Replacement")
    "fusion_last": ("fusion", "layer", -1),  # last decoder layer gated with the ID (Table 1 "Fusion", Eq. 3-4)
    "fusion_layer": ("fusion", "layer", None),  # one chosen layer (--config.model.layer), Figure 3's sweep
    "fusion_mean": ("fusion", "mean", -1),  # uniform mean of all layers, Figure 3's red line
    "dff": ("fusion", "learned", -1),  # DFF: learned global layer weights alpha + gate (Eq. 5-7)
    "caption": ("fusion", "layer", -1),  # caption-centric: a one-layer text-embedding feature set (4.2)
}


def flatten(tree: dict, prefix: str = "") -> dict:
    """A nested dict (a config's `to_dict()` or JSON) as {"group.field": value}."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 42  # MicroLens seeds 42 + rank; the study varies it over runs

    c.data = ml_collections.ConfigDict()
    c.data.dir = ""  # folder holding the interactions file
    c.data.interactions = ""  # file name inside data.dir
    c.data.format = "auto"  # auto | microlens_tsv | microlens_csv | ninerec | csv | movielens
    c.data.columns = ""  # column order override for header-less CSVs, e.g. "item,user,timestamp"
    c.data.min_seq_len = 5  # MicroLens read_behaviors: drop users with fewer items (0 = keep all)
    c.data.max_seq_len = 10  # SASRec input length (MicroLens max_seq_len_list = [10])
    c.data.window = 13  # keep each user's last max_seq_len + 3 items (0 = all history)
    c.data.min_rating = 0  # MovieLens only: drop ratings below this (0 = implicit feedback, keep all)
    c.data.duplicates = "drop"  # drop | error | keep rows repeating (user, item, timestamp) exactly (data.py)
    c.data.generate = ""  # "synthetic": generate data.dir with dff_jax.synthetic when it is absent
    c.data.synthetic = ml_collections.ConfigDict()  # generator arguments when generate == "synthetic"

    c.features = ml_collections.ConfigDict()
    c.features.dir = ""  # feature folder (*.tfrecord + schema.json); unused by the `id` encoder
    c.features.allow_missing = False  # zero-fill items without features (and report the count) instead of failing
    c.features.cache_dir = ""  # cache of the rows read (dff_jax/feature_cache.py); "" = <features.dir>/dff_cache

    c.model = ml_collections.ConfigDict()
    c.model.embed_dim = 1024  # paper: selected from {512, 1024, 2048}; MicroLens: 1024
    c.model.num_blocks = 2  # MicroLens transformer_block
    c.model.num_heads = 2  # MicroLens num_attention_heads
    c.model.dropout = 0.1  # MicroLens drop_rate
    c.model.pre_ln = False  # MicroLens uses post-LN
    c.model.max_seq_len = c.data.get_ref("max_seq_len")
    c.model.item_encoder = "fusion"  # id | replace | fusion
    c.model.content = "learned"  # layer | mean | learned (DFF)
    c.model.layer = -1  # stored row for content == "layer" (0 = embedding output, -1 = last decoder layer)
    c.model.layers = ()  # stored rows aggregated by mean/learned; () = all rows
    c.model.alpha_softmax = True  # DFF alpha = softmax(w), w initialised to 0 (uniform, Eq. 5)
    c.model.gate_hidden = 256  # hidden width of the gate MLP (Eq. 3/6)
    c.model.gate_dim = "vector"  # vector | scalar gate g
    c.model.proj_hidden = 0  # 0: one Linear projection of e_v into the behaviour space
    c.model.feature_norm = "standardize"  # none | layernorm | standardize (per stored layer, from the table)
    c.model.cold_id = "random"  # random (MicroLens init) | zero: ID rows of items unseen in training start (and stay) 0
    c.model.content_init = "default"  # default (lecun projection) | match_id: content rows start at the ID rows' norm
    c.model.dedup = "auto"  # auto | none | unique: embed each distinct item of a batch once (models.ItemEncoder)
    c.model.arch = "microlens"  # microlens (the paper's SASRec baseline) | sasrec (Kang & McAuley, as the torch port)
    c.model.rng_impl = "threefry2x32"  # PRNG of dropout and negatives: threefry2x32 (jax default) | rbg | unsafe_rbg

    c.loss = ml_collections.ConfigDict()
    c.loss.name = "inbatch_logq"  # inbatch_logq (MicroLens) | full_softmax | sampled_softmax | bce (NineRec)
    c.loss.num_negatives = 256  # sampled_softmax only
    c.loss.proposal = "uniform"  # sampled_softmax negatives: uniform | pop
    c.loss.logq = True  # subtract log proposal probability (popularity for in-batch)

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1e-4  # paper: selected from {1e-4, 1e-5, 1e-6}; MicroLens 1e-4, constant
    c.optim.weight_decay = 0.1  # paper/MicroLens AdamW wd; applied to kernels and embedding tables only
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.clip_norm = 5.0  # MicroLens clip_grad_norm_(max_norm=5)
    c.optim.alpha_lr_mult = 10.0  # DFF layer-weight logits step = alpha_lr_mult x lr (our choice; train.make_optimizer)

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 512  # global, users per step (MicroLens 512 per GPU on 1 GPU)
    c.train.num_epochs = 100  # paper 6.2: at most 100 epochs
    c.train.patience = 5  # paper 6.2: early stopping patience (0 = off)
    c.train.select_metric = "NDCG@10"  # validation metric for the best checkpoint / early stopping
    c.train.keep_checkpoints = 2  # latest checkpoints kept (the best is kept separately)
    c.train.compute_dtype = "float32"  # float32 | bfloat16 (params stay float32)
    c.train.log_every_steps = 50
    c.train.steps_per_call = 1  # train steps per jitted call (lax.scan over that many batches; train_state.py)
    c.train.progress_bar = True

    c.eval = ml_collections.ConfigDict()
    c.eval.ks = (10, 20)
    c.eval.batch_size = 1024  # users per evaluation batch (global)
    c.eval.mask_history = True  # MicroLens: score[history] = -inf (valid: train items; test: train + valid)
    c.eval.chunk_size = 8192  # items embedded and scored per chunk when ranking (bounded memory; keeps an H100 busy)
    c.eval.ties = "pessimistic"  # pessimistic (tied items rank above the target) | random | optimistic (protocol 3)
    c.eval.sampled_negatives = 0  # >0: also report sampled metrics vs K random negatives (labelled "sampled")
    c.eval.cold_bins = (0, 1, 5, 20)  # lower edges of train-count bins for the cold-start slices

    c.parallel = ml_collections.ConfigDict()
    c.parallel.model_axis = 1  # size of the "model" mesh axis (data axis = devices / model_axis)
    c.parallel.shard_items = False  # shard the item-ID table, feature table and their optimizer state on "model"
    c.parallel.coordinator_address = ""  # multi-host: host:port of process 0 (env/Slurm/Open MPI auto-detected)
    c.parallel.num_processes = 0
    c.parallel.process_id = -1
    c.parallel.initialization_timeout = 300  # seconds to wait for every process before failing
    c.parallel.cpu_devices = 0  # >0: simulate this many CPU devices (tests)
    c.parallel.deterministic_ops = False  # GPU: --xla_gpu_deterministic_ops (same bits per seed; the study sets it)
    return c


def apply_variant(c: ml_collections.ConfigDict, variant: str) -> ml_collections.ConfigDict:
    """Sets the model fields of one study variant (see VARIANTS); "" keeps the config's defaults."""
    if not variant:
        return c
    if variant not in VARIANTS:
        from dff_jax.errors import ConfigError  # a ValueError too

        raise ConfigError(f"unknown variant {variant!r}; expected one of {sorted(VARIANTS)}")
    encoder, content, layer = VARIANTS[variant]
    c.model.item_encoder = encoder
    c.model.content = content
    if layer is not None:
        c.model.layer = layer
    return c


# ------------------------------------------------------------------------------------------------------ validation
# What every field accepts, checked by `validate` before any work (data, features, compilation). Enumerations are
# read from the modules that implement them, so a new option is accepted where it is implemented, and only there.


def _choices() -> dict[str, tuple]:
    from dff_jax import data, losses, metrics, models

    return {
        "data.format": data.FORMATS,
        "data.generate": ("", "synthetic"),
        "data.duplicates": data.DUPLICATE_POLICIES,
        "model.item_encoder": models.ITEM_ENCODERS,
        "model.content": models.CONTENT_MODES,
        "model.gate_dim": models.GATE_DIMS,
        "model.feature_norm": models.FEATURE_NORMS,
        "model.cold_id": models.COLD_IDS,
        "model.content_init": models.CONTENT_INITS,
        "model.dedup": models.DEDUP_MODES,
        "model.arch": models.ARCHS,
        "model.rng_impl": models.RNG_IMPLS,
        "loss.name": losses.LOSSES,
        "loss.proposal": ("uniform", "pop"),
        "train.compute_dtype": ("float32", "bfloat16"),
        "eval.ties": metrics.TIES,
    }


# field -> (lowest, highest, what the bound means): None = unbounded; the bounds are inclusive unless named "<".
RANGES = {
    # jax.random.key and nnx.Rngs take a signed 64-bit seed (2**63 overflows after the data is read); numpy any size
    "seed": (0, 2**63 - 1, "a non-negative integer (at most 2**63 - 1)"),
    "data.min_seq_len": (0, None, ">= 0 (0 keeps every user)"),
    # Upper bounds on sizes (far above any real use) so an absurd value fails here, not as a multi-TB allocation
    # (docs/protocol.md section 8); a batch above the user count is allowed: one padded batch per epoch.
    "data.max_seq_len": (1, 1 << 16, ">= 1 (at most 65536)"),
    "data.window": (0, None, ">= 0 (0 keeps the whole history)"),
    "data.min_rating": (0, None, ">= 0"),
    "model.embed_dim": (1, None, ">= 1"),
    "model.num_blocks": (0, None, ">= 0"),
    "model.num_heads": (1, None, ">= 1"),
    "model.dropout": (0.0, "<1", "in [0, 1)"),
    "model.gate_hidden": (0, None, ">= 0 (0: one Linear)"),
    "model.proj_hidden": (0, None, ">= 0 (0: one Linear)"),
    "loss.num_negatives": (1, 1 << 24, ">= 1 (at most 2**24)"),  # 1e9 shared negatives: a 7 TB allocation
    "optim.lr": ("<0", None, "> 0"),
    "optim.weight_decay": (0.0, None, ">= 0"),
    "optim.b1": (0.0, "<1", "in [0, 1)"),
    "optim.b2": (0.0, "<1", "in [0, 1)"),
    "optim.clip_norm": (0.0, None, ">= 0 (0 = no clipping)"),
    "optim.alpha_lr_mult": (0.0, None, ">= 0"),
    "train.batch_size": (1, 1 << 24, ">= 1 (at most 2**24)"),
    "train.num_epochs": (1, None, ">= 1"),
    "train.patience": (0, None, ">= 0 (0 = no early stopping)"),
    "train.keep_checkpoints": (1, None, ">= 1 (a run resumes from its latest checkpoint)"),
    "train.log_every_steps": (1, None, ">= 1"),
    "train.steps_per_call": (1, None, ">= 1"),
    "eval.batch_size": (1, 1 << 24, ">= 1 (at most 2**24)"),
    "eval.chunk_size": (1, None, ">= 1"),
    "eval.sampled_negatives": (0, None, ">= 0 (0 = off)"),
    "parallel.model_axis": (1, None, ">= 1"),
    "parallel.num_processes": (0, None, ">= 0 (0 = from the environment)"),
    "parallel.process_id": (-1, None, ">= -1 (-1 = from the environment)"),
    "parallel.initialization_timeout": (1, None, ">= 1 second"),
    "parallel.cpu_devices": (0, None, ">= 0 (0 = leave alone)"),
}


# Fields a model reads only under some settings: field (or group, ending in ".") -> (does this config's model read
# it?, when it is read). An explicit command-line override of one the chosen variant ignores would change nothing but
# what config.json says (a `layers`/`layer` typo trains another model), so `check_overrides` refuses it.
READ_ONLY_WHEN = {
    "model.layer": (lambda c: c.model.item_encoder != "id" and c.model.content == "layer", "model.content='layer'"),
    "model.layers": (
        lambda c: c.model.item_encoder != "id" and c.model.content != "layer",
        "model.content='mean' or 'learned' (one layer: set config.model.layer)",
    ),
    "features.": (lambda c: c.model.item_encoder != "id", "a content item encoder (not model.item_encoder='id')"),
    # The gate of the gated fusion (Eq. 3/6), the content path, DFF's layer weights (Eq. 5), the ID table.
    "model.gate_hidden": (lambda c: c.model.item_encoder == "fusion", "model.item_encoder='fusion'"),
    "model.gate_dim": (lambda c: c.model.item_encoder == "fusion", "model.item_encoder='fusion'"),
    **{
        f"model.{name}": (lambda c: c.model.item_encoder != "id", "a content item encoder (not 'id')")
        for name in ("proj_hidden", "feature_norm", "content_init")
    },
    **{
        name: (
            lambda c: c.model.item_encoder != "id" and c.model.content == "learned",
            "model.content='learned' (DFF's layer weights)",
        )
        for name in ("model.alpha_softmax", "optim.alpha_lr_mult")
    },
    "model.cold_id": (lambda c: c.model.item_encoder != "replace", "an ID table (model.item_encoder 'id' or 'fusion')"),
    "loss.num_negatives": (lambda c: c.loss.name == "sampled_softmax", "loss.name='sampled_softmax'"),
    "loss.proposal": (lambda c: c.loss.name == "sampled_softmax", "loss.name='sampled_softmax'"),
    "loss.logq": (
        lambda c: c.loss.name in ("inbatch_logq", "sampled_softmax"),
        "loss.name 'inbatch_logq' or 'sampled_softmax'",
    ),
}


def check_overrides(config: ml_collections.ConfigDict, overridden: list[str]) -> None:
    """Refuses an explicitly overridden field (`overridden`: paths such as "model.layers") that the config's model
    does not read (READ_ONLY_WHEN), naming the field, the model and when the field is read."""
    from dff_jax.errors import ConfigError

    m = config.model
    for path in overridden:
        for field, (reads, when) in READ_ONLY_WHEN.items():
            if (path == field or field.endswith(".") and path.startswith(field)) and not reads(config):
                value = config
                for part in path.split("."):
                    value = value[part]
                chosen = (
                    f"loss.name={config.loss.name!r}"
                    if path.startswith("loss.")
                    else f"model.item_encoder={m.item_encoder!r}, model.content={m.content!r}"
                )
                raise ConfigError(
                    f"config.{path}={value!r}: not read by this variant ({chosen}); it is read only with {when}"
                )


def computed_metrics(eval_cfg) -> list[str]:
    """The metric names evaluation reports (what `train.select_metric` may name)."""
    names = [f"{m}@{k}" for k in eval_cfg.ks for m in ("HR", "NDCG")]
    if eval_cfg.sampled_negatives > 0:
        names += [f"sampled{eval_cfg.sampled_negatives}/{n}" for n in names]
    return names


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks every enumerated field, every range and the rules across fields; raises `errors.ConfigError` naming
    the field, the value and what is allowed. Called before a run does any work (train, study, evaluate)."""
    from dff_jax.errors import ConfigError

    def get(path):
        node = config
        for part in path.split("."):
            node = node[part]
        return node

    def fail(path, value, allowed):
        raise ConfigError(f"config.{path}={value!r}: expected {allowed}")

    for path, allowed in _choices().items():
        value = get(path)
        if value not in allowed:
            fail(path, value, "one of " + ", ".join(repr(a) for a in allowed))
    for path, (lo, hi, text) in RANGES.items():
        value = get(path)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            fail(path, value, f"a finite number {text}")  # NaN passes every comparison below
        if isinstance(lo, str) and value <= float(lo[1:]) or not isinstance(lo, str) and value < lo:
            fail(path, value, text)
        if hi is not None and (value >= float(hi[1:]) if isinstance(hi, str) else value > hi):
            fail(path, value, text)
        # An int field holds ints (every one with an int lower bound is declared int): 64.0 from an edited
        # config.json crashed where it sized an array.
        if isinstance(lo, int) and not isinstance(lo, bool) and isinstance(value, float):
            fail(path, value, f"an integer {text}")
    m, e, t = config.model, config.eval, config.train
    if m.embed_dim % m.num_heads:
        fail("model.embed_dim", m.embed_dim, f"a multiple of model.num_heads={m.num_heads}")
    if (
        not e.ks
        or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in e.ks)
        or len(set(e.ks)) < len(e.ks)
    ):
        fail("eval.ks", e.ks, "a non-empty tuple of distinct positive integers, e.g. (10, 20)")
    bins = list(e.cold_bins) if isinstance(e.cold_bins, (tuple, list)) else [e.cold_bins]
    integers = all(isinstance(b, int) and not isinstance(b, bool) for b in bins)  # 1.5 would mislabel the slices
    if not bins or not integers or bins[0] != 0 or any(b <= a for a, b in itertools.pairwise(bins)):
        fail("eval.cold_bins", e.cold_bins, "increasing integers starting at 0, e.g. (0, 1, 5, 20)")
    if t.select_metric not in computed_metrics(e):
        fail("train.select_metric", t.select_metric, "one of the computed metrics " + ", ".join(computed_metrics(e)))
    if config.data.generate == "synthetic" and not config.data.dir:
        fail("data.dir", config.data.dir, "a folder for the generated synthetic data")
    if m.item_encoder != "id" and not config.features.dir:
        fail("features.dir", config.features.dir, f"a feature folder (model.item_encoder={m.item_encoder!r})")
