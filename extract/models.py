"""Backends: run a frozen model over a batch of items and return pooled per-layer hidden states.

Two built-in backends, both plain transformers:

* `VisionLanguageBackend`: `AutoProcessor` + `AutoModelForImageTextToText` for the video-capable
  families of transformers 5.x (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, LLaVA-OneVision, LLaVA-NeXT-Video,
  Video-LLaVA, SmolVLM2, InternVL, MiniCPM-V 4.6+, ...) and any modality (video, cover, title);
* `TextBackend`: `AutoModelForCausalLM` for the title modality with a text-only decoder (a folder,
  a hub name, or a `.gguf` file).

Hidden states: the layers + 1 states `output_hidden_states=True` would give (index 0 = embedding output; the
last one is the final-norm output in HF decoders), each pooled per item by forward hooks as its layer
produces it (`LayerPooler`: no stack of all layers is kept) (paper section 4.3
studies all decoder layers, so all are kept). Pooling: "video_mean" = mean over the visual tokens
(video tokens, or image tokens for families that expand frames into images, or the cover image's
tokens); "last" = the last prompt token; "all_mean" = mean over all real (non-padding) tokens.
Batches are left-padded so "last" is position -1 for every row and batched vectors equal one-by-one.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import threading
from pathlib import Path

import numpy as np
import torch

from dff_jax import records
from extract import ExtractError
from extract.items import Item
from extract.video import Clip

# Paper Table 3 / section 6.4.1, verbatim ("w/ video rec prompt" and "w/o video rec prompt").
PROMPTS = {
    "rec": (
        "You are watching a micro-video on a social media platform. Please analyze the video content for "
        "application in a micro-video recommendation system. Write one coherent paragraph describing the scene, "
        "people or objects, main actions, and the style or type."
    ),
    "plain": (
        "You are watching a video. Write one coherent paragraph describing the scene, people or objects, "
        "main actions, and the style or type."
    ),
}
POOLINGS = ("video_mean", "last", "all_mean")
MODALITIES = ("video", "cover", "title")
# Config attributes naming the placeholder ids a processor expands into visual tokens, in order of
# preference. SmolVLM and InternVL expand video frames into *image* tokens, so image ids count too.
VIDEO_TOKEN_ATTRS = ("video_token_id", "video_token_index")
IMAGE_TOKEN_ATTRS = ("image_token_id", "image_token_index")


def resolve_prompt(prompt: str) -> tuple[str, str]:
    """Maps `--prompt` to (name, text): "rec"/"plain" are the paper's prompts, anything else is used as is."""
    if prompt in PROMPTS:
        return prompt, PROMPTS[prompt]
    if not prompt.strip():
        raise ExtractError("--prompt is empty; use rec, plain or a custom text")
    return "custom", prompt


@dataclasses.dataclass
class Sample:
    """One decoded item ready for a backend: exactly one of clip/image is set for video/cover."""

    item: Item
    clip: Clip | None = None
    image: np.ndarray | None = None


def title_text(item: Item, prompt: str) -> str:
    """The user message for the title modality: the item's text, then the instruction."""
    return f"Title: {item.text}\n{prompt}"


def visual_token_ids(config, modality: str) -> list[int]:
    """The token ids whose positions hold visual tokens for this modality, read from the model config."""
    attrs = IMAGE_TOKEN_ATTRS if modality == "cover" else VIDEO_TOKEN_ATTRS + IMAGE_TOKEN_ATTRS
    ids = []
    for cfg in (config, getattr(config, "text_config", None)):
        for name in attrs:
            value = getattr(cfg, name, None) if cfg is not None else None
            if isinstance(value, int) and value >= 0 and value not in ids:
                ids.append(value)
    return ids


def pool_hidden_states(
    hidden_states, attention_mask: torch.Tensor, visual_mask: torch.Tensor | None, pool: str
) -> torch.Tensor:
    """Pools every layer's [B, S, H] states into [B, layers, H] float32.

    Args:
      hidden_states: the model's tuple of layers + 1 tensors [B, S, H] (left-padded batch).
      attention_mask: [B, S], 1 for real tokens.
      visual_mask: [B, S] bool, True at visual-token positions (needed for "video_mean").
      pool: one of POOLINGS.
    """
    weights, counts = pool_weights(attention_mask, visual_mask, pool)
    # Layer by layer (not one stacked [layers, B, S, H] tensor).
    return torch.stack([_pool_one(h, weights, counts) for h in hidden_states], dim=1)


def _pool_one(h: torch.Tensor, weights: torch.Tensor | None, counts: torch.Tensor | None) -> torch.Tensor:
    """[B, S, H] -> [B, H] float32: the last position, or the weighted mean over positions (left padding)."""
    if weights is None:
        return h[:, -1].float()
    return (h.float() * weights).sum(dim=1) / counts[:, None]


def pool_weights(attention_mask: torch.Tensor, visual_mask: torch.Tensor | None, pool: str):
    """(weights [B, S, 1] float32, counts [B]) for a mean pooling; (None, None) for "last"."""
    if pool == "last":
        return None, None
    if pool == "video_mean":
        if visual_mask is None:
            raise ExtractError("--pool video_mean needs visual tokens; use --pool all_mean or last for titles")
        mask = visual_mask
    elif pool == "all_mean":
        mask = attention_mask.bool()
    else:
        raise ExtractError(f"unknown --pool {pool!r}; expected one of {POOLINGS}")
    counts = mask.sum(dim=1)
    if bool((counts == 0).any()):
        raise RuntimeError(f"{int((counts == 0).sum())} item(s) have no token to pool for {pool}")
    return mask.to(torch.float32).unsqueeze(-1), counts


class LayerPooler:
    """Pools every decoder layer's output as the layer produces it, so no [layers + 1, B, S, H] stack is kept.

    Reproduces `output_hidden_states=True` exactly (transformers 5.x records them with hooks the same way):
    row 0 is the first decoder layer's input, row i the output of layer i - 1, and the last row the decoder's
    `last_hidden_state` (the final norm's output) unless the config sets `tie_last_hidden_states=False`.
    Deepstack additions (Qwen3-VL) happen between layers and are not part of a layer's output, as there.
    """

    def __init__(self, model):
        decoder = model.get_decoder()
        layers = getattr(decoder, "layers", None)
        if layers is None or len(layers) == 0:
            raise ExtractError(f"{type(model).__name__}: no decoder layers found (decoder.layers) to pool")
        self.decoder, self.layers = decoder, list(layers)
        self.tie_last = getattr(decoder.config, "tie_last_hidden_states", None) is not False
        self.rows: list[torch.Tensor] = []
        self.weights = self.counts = None

    def _layer_hook(self, index):
        def hook(module, args, kwargs, output):
            if index == 0 and not self.rows:
                self.rows.append(_pool_one(args[0] if args else kwargs["hidden_states"], self.weights, self.counts))
            if index == len(self.layers) - 1 and self.tie_last:
                return  # replaced by the decoder's last_hidden_state below
            h = output[0] if isinstance(output, tuple) else output
            self.rows.append(_pool_one(h, self.weights, self.counts))

        return hook

    def _decoder_hook(self, module, args, output):
        if self.tie_last:
            self.rows.append(_pool_one(output.last_hidden_state, self.weights, self.counts))

    def run(self, forward, attention_mask, visual_mask, pool) -> torch.Tensor:
        """Calls `forward()` with the hooks in place; returns [B, layers + 1, H] float32 on the model's device."""
        self.weights, self.counts = pool_weights(attention_mask, visual_mask, pool)
        self.rows = []
        handles = [
            layer.register_forward_hook(self._layer_hook(i), with_kwargs=True) for i, layer in enumerate(self.layers)
        ]
        handles.append(self.decoder.register_forward_hook(self._decoder_hook))
        try:
            forward()
        finally:
            for h in handles:
                h.remove()
        if len(self.rows) != len(self.layers) + 1:
            raise RuntimeError(f"pooled {len(self.rows)} hidden states, expected {len(self.layers) + 1}")
        rows, self.rows = self.rows, []
        return torch.stack(rows, dim=1)


def _forward_kwargs(model) -> dict:
    """Avoids materialising full-sequence logits: only the last position's (or none at all)."""
    params = inspect.signature(model.forward).parameters
    # Hidden states are pooled by LayerPooler's hooks as they are produced, not returned.
    kwargs = {"output_hidden_states": False, "use_cache": False, "return_dict": True}
    if "logits_to_keep" in params:
        kwargs["logits_to_keep"] = 1
    elif "num_logits_to_keep" in params:
        kwargs["num_logits_to_keep"] = 1
    return kwargs


def _left_padded_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    # With left padding, a row's first real token must get position 0 (as generate() does), so a
    # batched row sees exactly the positions it would see alone.
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _torch_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        # bf16 on GPUs (the paper's setting); fp32 on CPUs, where bf16 matmuls are slower (notes: 2.5x).
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def check_location(flag: str, location: str) -> None:
    """A hub id is `org/name` (or `name`); a location that is neither that nor a file or folder here is a mistyped
    path: say so, instead of the hub client's message about repo-id characters or the network."""
    if Path(location).exists():
        return
    if Path(location).is_absolute() or location.startswith((".", "~")) or location.count("/") > 1:
        raise ExtractError(f"{flag} {location}: no such file or folder (and not a Hugging Face hub id 'org/name')")


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")


def weights_fingerprint(location: str) -> str | None:
    """A cheap identity of a model's files: sha256 over config.json and, per weights file, its name, size and first
    and last MiB (weights edited in place, another snapshot of a hub id, a re-download of another revision). A hub
    id is looked up in the local hub cache; None where no local files are found. Part of the run identity."""
    import hashlib

    path = Path(location)
    if not path.exists():
        try:
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(location, local_files_only=True))
        except Exception:  # not cached, or not a hub id: nothing local to identify
            return None
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    for f in files:
        if f.name != "config.json" and f.suffix not in WEIGHT_SUFFIXES:
            continue
        digest.update(f"{f.relative_to(path) if f != path else f.name}:{f.stat().st_size}\0".encode())
        records.update_with_ends(digest, f)
    return digest.hexdigest()


def _gguf_location(model: str) -> tuple[str, dict]:
    path = Path(model)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ExtractError(f"{path}: GGUF file not found")
        return str(path.parent), {"gguf_file": path.name}
    return model, {}


# Default visual-token budgets (paper section 3: up to 16 frames per video). Families whose processors have a
# pixel budget get one that bounds a 16-frame clip to ~2k visual tokens (Qwen2/2.5-VL: 256 tokens per 2-frame
# temporal patch, the per-frame budget qwen-vl-utils uses for dense sampling; Qwen3-VL the same per frame) and
# covers to ~1k; MiniCPM-V 4.6/4.7 frames go in unsliced (one 448 px view, 64 tokens per frame, as the paper's
# MiniCPM-V 2.6 with max_slice_nums=1). Families with fixed-size frames (LLaVA-OneVision 196, LLaVA-NeXT-Video
# 144, InternVL 256, Video-LLaVA 257 tokens per frame, SmolVLM2) keep their processors' sizes; every family's
# count is measured per item and checked against the context before a run.
QWEN_PIXEL_BUDGETS = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")
QWEN_TOTAL_PIXEL_BUDGETS = ("qwen3_vl", "qwen3_vl_moe")  # size["longest_edge"] bounds the whole clip
VIDEO_TOKENS_PER_FRAME = 128
COVER_TOKENS = 1024
MINICPMV_NATIVE = ("minicpmv4_6", "minicpmv4_7")
SIZE_ATTRS = ("size", "crop_size", "slice_mode", "max_slice_nums", "scale_resolution", "patch_size", "merge_size")


def _token_pixels(proc) -> int:
    """Pixels per visual token of a Qwen-style processor: (patch size x merge size) squared."""
    return (int(getattr(proc, "patch_size", 14)) * int(getattr(proc, "merge_size", 2))) ** 2


def apply_token_budget(processor, model_type: str, num_frames: int, max_pixels: int | None, model: str) -> int | None:
    """Sets the family's default visual-token budget (or `--max-pixels`, pixels per frame or cover) on the processor.

    Returns the pixels per frame the processor resizes a frame to (None when it keeps frames at their size or
    it is not known); decoding may shrink frames to a few times that before the processor sees them.
    """
    vp = getattr(processor, "video_processor", None)
    ip = getattr(processor, "image_processor", None)
    if model_type in QWEN_PIXEL_BUDGETS:
        for proc in (vp, ip):
            least = _token_pixels(proc) if proc is not None else 0
            if max_pixels and max_pixels < least:  # the processor would fail on every item (a traceback before)
                raise ExtractError(
                    f"{model}: --max-pixels {max_pixels} is less than one visual token ({least} pixels: "
                    f"(patch size x merge size) squared); expected at least {least}"
                )
        if ip is not None and getattr(ip, "size", None) is not None and ip.size.longest_edge:
            # --max-pixels is the cover's budget too (pixels of the image), else ~COVER_TOKENS tokens.
            ip.size.longest_edge = int(max_pixels) if max_pixels else COVER_TOKENS * _token_pixels(ip)
            ip.size.shortest_edge = min(ip.size.shortest_edge or 0, ip.size.longest_edge)
        if vp is None or getattr(vp, "size", None) is None or vp.size.longest_edge is None:
            return None
        if hasattr(vp, "cap_pixels_per_frame") and vp.cap_pixels_per_frame is None:
            vp.cap_pixels_per_frame = True  # qwen-vl-utils' rule; below our budget it changes nothing, and it is quiet
        temporal = int(getattr(vp, "temporal_patch_size", 2) or 1)
        per_frame = int(max_pixels) if max_pixels else VIDEO_TOKENS_PER_FRAME * temporal * _token_pixels(vp)
        frames = -(-max(num_frames, temporal) // temporal) * temporal
        vp.size.longest_edge = per_frame * frames if model_type in QWEN_TOTAL_PIXEL_BUDGETS else per_frame
        # The floor must not exceed the cap (tiny test processors have small caps).
        vp.size.shortest_edge = min(vp.size.shortest_edge or 0, vp.size.longest_edge // frames)
        return per_frame
    if max_pixels:
        raise ExtractError(
            f"{model}: --max-pixels applies to Qwen-VL pixel budgets only ({model_type} has fixed sizes)"
        )
    if model_type in MINICPMV_NATIVE and vp is not None:
        vp.slice_mode = False
        processor.video_slice_mode = False  # read once by the processor's __init__
        return int(vp.scale_resolution) ** 2
    size = getattr(vp, "size", None)
    if size is not None and getattr(size, "height", None) and getattr(size, "width", None):
        return int(size.height) * int(size.width)
    return None


def _jsonable(value):
    if dataclasses.is_dataclass(value):  # transformers' SizeDict
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if hasattr(value, "items"):
        return {k: _jsonable(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value if isinstance(value, (int, float, str, bool)) or value is None else str(value)


def processor_settings(processor) -> dict:
    """The processor settings that decide visual tokens (part of a run's identity)."""
    out = {}
    for name in ("image_processor", "video_processor"):
        proc = getattr(processor, name, None)
        if proc is not None:
            out[name] = {a: _jsonable(getattr(proc, a)) for a in SIZE_ATTRS if getattr(proc, a, None) is not None}
    return out


def _pad_clip(clip: Clip, min_frames: int) -> Clip:
    """Repeats the last frame until the clip has `min_frames` frames (one nominal frame apart)."""
    missing = min_frames - len(clip.frames)
    if missing <= 0:
        return clip
    frames = np.concatenate([clip.frames, np.repeat(clip.frames[-1:], missing, axis=0)])
    indices = clip.indices + [clip.indices[-1] + k + 1 for k in range(missing)]
    timestamps = clip.timestamps + [clip.timestamps[-1] + (k + 1) / clip.fps for k in range(missing)]
    return dataclasses.replace(
        clip,
        frames=frames,
        indices=indices,
        timestamps=timestamps,
        total_frames=max(clip.total_frames, indices[-1] + 1),
    )


def dtype_key() -> str:
    """The `from_pretrained` keyword for the weights' dtype: `dtype` from transformers 4.56 on, `torch_dtype`
    before (MiniCPM-V 2.6's remote code is written for 4.40)."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def load_weights(auto_class, location, what: str, ignore: tuple[str, ...] = (), **kwargs):
    """`auto_class.from_pretrained(location, **kwargs)`, refused when the checkpoint lacks weights the model has:
    transformers would initialise those at random and only log it, and every feature would be computed through
    random layers (a partial download, a damaged shard, a folder of another architecture). `ignore`: prefixes of
    weights the caller never uses (a text encoder's pooler head)."""
    from safetensors import SafetensorError

    try:
        model, info = auto_class.from_pretrained(location, output_loading_info=True, **kwargs)
    except SafetensorError as e:  # a truncated or overwritten *.safetensors file: its header cannot be parsed
        raise ExtractError(
            f"{what}: cannot read the weights ({e}): a damaged or partial download? download the model again"
        ) from None
    missing = sorted(k for k in info.get("missing_keys", ()) if not k.startswith(ignore))
    if missing:
        raise ExtractError(
            f"{what}: the checkpoint lacks {len(missing)} weight(s) of the model, e.g. {missing[:3]}; they would be "
            "random (an incomplete download or a damaged shard?): download the model again"
        )
    return model


def load_kwargs(compute_dtype: str, device: str, attn_implementation: str | None) -> dict:
    """`from_pretrained` arguments: weights loaded straight onto the device (no full copy in host RAM first)."""
    kwargs = {"dtype": _torch_dtype(compute_dtype, device), "device_map": device}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    return kwargs


@dataclasses.dataclass
class Prepared:
    """A batch turned into model inputs (on the CPU), one group per frame count; made in the decode workers."""

    samples: list[Sample]
    groups: list[tuple[list[int], object]]  # (row indices into samples, processor output)
    visual_tokens: list[int]  # per sample


def frame_groups(samples: list[Sample]) -> list[list[int]]:
    """Row indices grouped by frame count (LLaVA-style processors stack frames: one count per call)."""
    groups: dict[int, list[int]] = {}
    for i, s in enumerate(samples):
        groups.setdefault(len(s.clip.frames) if s.clip is not None else 0, []).append(i)
    return list(groups.values())


class VisionLanguageBackend:
    """The generic `AutoProcessor` + `AutoModelForImageTextToText` path."""

    def __init__(
        self,
        model: str,
        *,
        modality: str,
        prompt: str,
        device: str,
        compute_dtype: str,
        trust_remote_code: bool = False,
        max_pixels: int | None = None,
        num_frames: int = 16,
        attn_implementation: str | None = None,
    ):
        from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

        self.modality, self.prompt, self.device = modality, prompt, device
        try:
            config = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
            processor = AutoProcessor.from_pretrained(model, trust_remote_code=trust_remote_code)
        except (OSError, ValueError, ImportError) as e:
            raise ExtractError(f"{model}: no processor could be loaded ({type(e).__name__}: {e})") from None
        if getattr(processor, "tokenizer", None) is None:
            raise ExtractError(f"{model}: the processor has no tokenizer (not a vision-language model folder?)")
        if modality == "video" and getattr(processor, "video_processor", None) is None:
            raise ExtractError(f"{model}: the processor has no video processor; --modality video needs one")
        if modality == "cover" and getattr(processor, "image_processor", None) is None:
            raise ExtractError(f"{model}: the processor has no image processor; --modality cover needs one")
        self.model_type = config.model_type
        self.frame_pixels = apply_token_budget(processor, config.model_type, num_frames, max_pixels, model)
        try:
            net = load_weights(
                AutoModelForImageTextToText,
                model,
                model,
                trust_remote_code=trust_remote_code,
                **load_kwargs(compute_dtype, device, attn_implementation),
            )
        except (OSError, ValueError, ImportError) as e:
            raise ExtractError(
                f"{model}: cannot load as an image-text-to-text model ({type(e).__name__}: {e})"
            ) from None
        self._setup(net, processor, model)

    @classmethod
    def from_parts(
        cls, model, processor, *, modality: str, prompt: str, device: str, num_frames: int = 16, max_pixels=None
    ):
        """Wraps an already built model + processor (benchmarks at a real shape with random weights)."""
        self = cls.__new__(cls)
        self.modality, self.prompt, self.device = modality, prompt, device
        self.model_type = model.config.model_type
        self.frame_pixels = apply_token_budget(processor, model.config.model_type, num_frames, max_pixels, "model")
        self._setup(model, processor, type(model).__name__)
        return self

    def _setup(self, model, processor, name: str) -> None:
        self.model, self.processor = model.eval(), processor
        processor.tokenizer.padding_side = "left"
        modality = self.modality
        self.visual_ids = torch.tensor(visual_token_ids(self.model.config, modality), dtype=torch.long)
        if modality != "title" and len(self.visual_ids) == 0:
            raise ExtractError(f"{name}: config has none of {VIDEO_TOKEN_ATTRS + IMAGE_TOKEN_ATTRS}")
        # Qwen3-VL's processor rejects clips shorter than its temporal patch (2 frames); a 1-frame clip
        # is repeated instead (Qwen2-VL pads the same way internally).
        self.min_frames = int(getattr(getattr(processor, "video_processor", None), "temporal_patch_size", 1) or 1)
        base = getattr(self.model, "model", self.model)
        # Multimodal-RoPE families (Qwen-VL, GLM-4V) derive positions from the mask themselves.
        self._pass_positions = not hasattr(base, "get_rope_index")
        self._kwargs = _forward_kwargs(self.model)
        self.pooler = LayerPooler(self.model)
        text_config = getattr(self.model.config, "text_config", self.model.config)
        self.context = getattr(text_config, "max_position_embeddings", None)
        self.settings = processor_settings(processor)
        # Each decode worker thread preprocesses with its own processor copy: a fast tokenizer's padding
        # settings are mutated on every call, which is not safe to share between threads.
        self._local = threading.local()
        self._frame_sizes: dict[tuple[int, int, int], tuple[int, int] | None] = {}

    def frame_size(self, height: int, width: int, frames: int) -> tuple[int, int] | None:
        """The (height, width) the video processor resizes `frames` upright frames of this size to, when decoding
        straight to it leaves the processor nothing to resize; None otherwise (decoding then only shrinks frames).

        Only the Qwen-VL pixel budgets qualify: a plain aspect-keeping resize to multiples of patch x merge that
        leaves its own output unchanged (checked: resizing the result again must give the same size). Fixed-size
        families crop or slice, which a resize while decoding would not reproduce. The size is asked of the
        processor itself (one black clip per distinct frame size and count, then cached), so it follows the
        installed transformers' rounding and per-frame caps.
        """
        if self.modality != "video" or self.model_type not in QWEN_PIXEL_BUDGETS:
            return None
        key = (height, width, max(frames, self.min_frames))
        if key not in self._frame_sizes:
            try:
                size = self._resized_size(*key)
                size = size if size and self._resized_size(*size, key[2]) == size else None
            except ValueError:  # e.g. an aspect ratio over 200: prepare() then reports it as this item's failure
                size = None
            # A dict write is atomic under the GIL; two workers computing the same key at once agree.
            self._frame_sizes[key] = size
        return self._frame_sizes[key]

    def _resized_size(self, height: int, width: int, frames: int) -> tuple[int, int] | None:
        vp = self._processor().video_processor
        out = vp(
            videos=[np.zeros((frames, height, width, 3), np.uint8)],
            do_sample_frames=False,
            input_data_format="channels_last",
            return_tensors="pt",
        )
        grid = out.get("video_grid_thw")
        if grid is None:
            return None
        patch = int(vp.patch_size)
        return int(grid[0][1]) * patch, int(grid[0][2]) * patch

    def _processor(self):
        if threading.current_thread() is threading.main_thread():
            return self.processor
        proc = getattr(self._local, "processor", None)
        if proc is None:
            proc = self._local.processor = copy.deepcopy(self.processor)
        return proc

    def _message(self, sample: Sample) -> list[dict]:
        if self.modality == "title":
            content = [{"type": "text", "text": title_text(sample.item, self.prompt)}]
        else:
            kind = "video" if self.modality == "video" else "image"
            content = [{"type": kind}, {"type": "text", "text": self.prompt}]
        return [{"role": "user", "content": content}]

    def inputs(self, samples: list[Sample], device: str | None = None):
        """Processor outputs (left-padded) for samples of one frame count, on `device` (default: the model's)."""
        from transformers.video_utils import VideoMetadata

        processor = self._processor()
        texts = [
            processor.apply_chat_template(self._message(s), add_generation_prompt=True, tokenize=False) for s in samples
        ]
        kwargs = {"text": texts, "padding": True, "return_tensors": "pt"}
        if self.modality == "video":
            samples = [dataclasses.replace(s, clip=_pad_clip(s.clip, self.min_frames)) for s in samples]
            kwargs["videos"] = [s.clip.frames for s in samples]
            # Frames are already sampled (video.read_clip): the processor must not sample again, and the
            # metadata carries the true timestamps (Qwen3-VL writes them into the prompt).
            kwargs["video_metadata"] = [
                VideoMetadata(
                    total_num_frames=s.clip.total_frames,
                    fps=s.clip.fps,
                    frames_indices=s.clip.indices,
                    duration=s.clip.duration,
                    height=int(s.clip.frames.shape[1]),
                    width=int(s.clip.frames.shape[2]),
                )
                for s in samples
            ]
            kwargs["do_sample_frames"] = False
        elif self.modality == "cover":
            # One list per sample: a flat list is read by SmolVLM and Gemma3 as one sample with B images.
            kwargs["images"] = [[s.image] for s in samples]
        if self.modality != "title":
            # Frames and covers are [H, W, 3]: said outright, since the processors guess the channel axis and take
            # a picture 1 or 3 pixels high for channels-first (a 1 x 1 placeholder cover, a 3 x 40 clip).
            kwargs["input_data_format"] = "channels_last"
        return processor(**kwargs).to(device or self.device)

    def visual_mask(self, x) -> torch.Tensor | None:
        if self.modality == "title":
            return None
        return torch.isin(x["input_ids"], self.visual_ids.to(x["input_ids"].device))

    def prepare(self, samples: list[Sample], check: bool = True) -> Prepared:
        """Model inputs for a batch, built on the CPU (thread-safe: runs in the decode workers)."""
        groups, tokens = [], [0] * len(samples)
        for idx in frame_groups(samples):
            x = self.inputs([samples[i] for i in idx], device="cpu")
            if check:
                check_fits(x, self.context)
            vis = self.visual_mask(x)
            for row, i in enumerate(idx):
                tokens[i] = int(vis[row].sum()) if vis is not None else 0
            groups.append((idx, x))
        return Prepared(samples, groups, tokens)

    def check_context(self, samples: list[Sample], what: str) -> dict:
        """Raises ExtractError before a run when an item of this shape would not fit the model's context."""
        prepared = self.prepare(samples, check=False)  # the error below says more than check_fits
        seq = max(int(x["input_ids"].shape[1]) for _, x in prepared.groups)
        if self.context and seq > self.context:
            raise ExtractError(
                f"{what}: {seq} tokens per item ({max(prepared.visual_tokens)} visual) exceed the model's context of "
                f"{self.context} (max_position_embeddings); use fewer --frames or a smaller --max-pixels"
            )
        return {"sequence_tokens": seq, "visual_tokens": max(prepared.visual_tokens), "context": self.context}

    def hidden_states(self, samples: list[Sample], pool: str) -> torch.Tensor:
        """Pooled states [B, layers + 1, H] float32 (CPU) for a batch; see module docstring."""
        return self.forward(self.prepare(samples), pool)

    @torch.inference_mode()
    def forward(self, prepared: Prepared, pool: str) -> torch.Tensor:
        """Pooled states for a prepared batch; frame-count groups go through the model one after another."""
        self.last_visual_tokens = prepared.visual_tokens  # read by the run for the manifest
        result = [None] * len(prepared.samples)
        for idx, x in prepared.groups:
            x = x.to(self.device)
            extra = {}
            if self._pass_positions:
                extra["position_ids"] = _left_padded_positions(x["attention_mask"])
            pooled = self.pooler.run(
                lambda x=x, extra=extra: self.model(**x, **self._kwargs, **extra),
                x["attention_mask"],
                self.visual_mask(x),
                pool,
            ).cpu()
            for row, i in enumerate(idx):
                result[i] = pooled[row]
        return torch.stack(result)

    @torch.inference_mode()
    def generate(self, samples: list[Sample], max_new_tokens: int) -> list[str]:
        """One greedy caption per item with the same inputs (paper 4.2), batched per frame count."""
        captions = [None] * len(samples)
        for idx in frame_groups(samples):
            x = self.inputs([samples[i] for i in idx])
            out = self.model.generate(**x, max_new_tokens=max_new_tokens, do_sample=False)
            texts = self.processor.batch_decode(out[:, x["input_ids"].shape[1] :], skip_special_tokens=True)
            for i, t in zip(idx, texts):
                captions[i] = t.strip()
        return captions


class TextBackend:
    """`AutoModelForCausalLM` over "Title: <text>\\n<prompt>" (title modality, text-only decoders)."""

    def __init__(
        self,
        model: str,
        *,
        prompt: str,
        device: str,
        compute_dtype: str,
        trust_remote_code: bool = False,
        attn_implementation: str | None = None,
    ):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.prompt, self.device = prompt, device
        location, extra = _gguf_location(model)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code, **extra)
        except (OSError, ValueError) as e:
            raise ExtractError(f"{model}: no tokenizer could be loaded ({type(e).__name__}: {e})") from None
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        try:
            self.model = load_weights(
                AutoModelForCausalLM,
                location,
                model,
                trust_remote_code=trust_remote_code,
                **load_kwargs(compute_dtype, device, attn_implementation),
                **extra,
            ).eval()
        except (OSError, ValueError, ImportError) as e:
            raise ExtractError(f"{model}: cannot load as a causal language model ({type(e).__name__}: {e})") from None
        self._kwargs = _forward_kwargs(self.model)
        self.pooler = LayerPooler(self.model)
        self.context = getattr(self.model.config, "max_position_embeddings", None)
        self.settings = {}

    def inputs(self, samples: list[Sample]):
        """Tokenised, left-padded prompts on the model's device; refused (`check_fits`) past the context."""
        x = self._tokenized(samples)
        check_fits(x, self.context)
        return x

    def _tokenized(self, samples: list[Sample]):
        texts = [title_text(s.item, self.prompt) for s in samples]
        if getattr(self.tokenizer, "chat_template", None):
            texts = [
                self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": t}], add_generation_prompt=True, tokenize=False
                )
                for t in texts
            ]
            # The chat template already holds the BOS token where the model wants one.
            return self.tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False).to(self.device)
        return self.tokenizer(texts, padding=True, return_tensors="pt").to(self.device)

    @torch.inference_mode()
    def hidden_states(self, samples: list[Sample], pool: str) -> torch.Tensor:
        x = self.inputs(samples)
        positions = _left_padded_positions(x["attention_mask"])
        return self.pooler.run(
            lambda: self.model(**x, position_ids=positions, **self._kwargs), x["attention_mask"], None, pool
        ).cpu()

    @torch.inference_mode()
    def generate(self, samples: list[Sample], max_new_tokens: int) -> list[str]:
        x = self.inputs(samples)
        out = self.model.generate(
            **x, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=self.tokenizer.pad_token_id
        )
        return [
            t.strip() for t in self.tokenizer.batch_decode(out[:, x["input_ids"].shape[1] :], skip_special_tokens=True)
        ]


def check_fits(x, context: int | None) -> None:
    """Raises ValueError (the batch is retried one by one, the item then recorded as a model failure) for an input
    longer than the model's context: its positions past the context are ones the model never saw (a 9,000-token
    title through a 4,096-token model), so its hidden states are not features of the item."""
    if not context:
        return
    lengths = x["attention_mask"].sum(dim=1)
    if int(lengths.max()) > context:
        raise ValueError(
            f"{int(lengths.max())} tokens exceed the model's context of {context} (max_position_embeddings); a "
            "shorter title or prompt, fewer --frames or a smaller --max-pixels"
        )


def is_causal_lm(model: str, trust_remote_code: bool = False) -> bool:
    """True when `model` is a GGUF file or its config maps to AutoModelForCausalLM but not to a VLM class."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    location, extra = _gguf_location(model)
    if extra:
        return True
    check_location("--model", location)
    try:
        config = AutoConfig.from_pretrained(location, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ExtractError(f"{model}: no model config could be loaded ({type(e).__name__}: {e})") from None
    kind = config.model_type
    return kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and kind not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES


def storage_problem(vectors: torch.Tensor, dtype: str) -> str | None:
    """Why `vectors` cannot be stored as features in `dtype`, or None: NaN/Inf (a diverging model, or float16
    overflow) or magnitudes the trainer refuses (dff_jax.features.MAX_ABS); recorded as the item's failure, since a
    finished folder holding them would stop every training run on it (docs/protocol.md section 8). Vectors already
    cast to `dtype` (as the run passes them, to cast once) are not copied."""
    from dff_jax.features import MAX_ABS

    stored = vectors.to(STORAGE_DTYPES[dtype]).float()
    bad = ~torch.isfinite(stored) | (stored.abs() >= MAX_ABS)
    if not bad.any():
        return None
    layer = int(bad.any(dim=-1).nonzero()[0, 0])
    finite = bool(torch.isfinite(stored[layer]).all())
    what = f"|x| up to {float(vectors[layer].float().abs().max()):.4g}" if finite else "NaN or Inf"
    hint = " (float16 overflows above 65504: use --dtype bfloat16 or float32)" if dtype == "float16" else ""
    return (
        f"hidden states of row {layer} hold {what} stored as {dtype}, beyond what dff_jax loads (finite, |x| < 2^20)"
        f"{hint}; not stored"
    )


STORAGE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def to_storage_bytes(vectors: torch.Tensor, dtype: str) -> bytes:
    """Casts [layers, H] float32 to the storage dtype; raw little-endian bytes for dff_jax.records.

    bfloat16 goes through an int16 view because numpy has no bfloat16 of its own.
    """
    t = vectors.to(STORAGE_DTYPES[dtype]).contiguous()
    if dtype == "bfloat16":
        t = t.view(torch.int16)
    return t.numpy().tobytes()
