"""Backends: run a frozen model over a batch of items and return pooled per-layer hidden states.

Two built-in backends, both plain transformers:

* `VisionLanguageBackend`: `AutoProcessor` + `AutoModelForImageTextToText` for the video-capable
  families of transformers 5.x (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, LLaVA-OneVision, LLaVA-NeXT-Video,
  Video-LLaVA, SmolVLM2, InternVL, MiniCPM-V 4.6+, ...) and any modality (video, cover, title);
* `TextBackend`: `AutoModelForCausalLM` for the title modality with a text-only decoder (a folder,
  a hub name, or a `.gguf` file).

Hidden states: `output_hidden_states=True` gives layers + 1 tensors (index 0 = embedding output; the
last one is the final-norm output in HF decoders); every one is pooled per item (paper section 4.3
studies all decoder layers, so all are kept). Pooling: "video_mean" = mean over the visual tokens
(video tokens, or image tokens for families that expand frames into images, or the cover image's
tokens); "last" = the last prompt token; "all_mean" = mean over all real (non-padding) tokens.
Batches are left-padded so "last" is position -1 for every row and batched vectors equal one-by-one.
"""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import numpy as np
import torch

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
    if pool == "last":
        return torch.stack([h[:, -1].float() for h in hidden_states], dim=1)
    if pool == "video_mean":
        if visual_mask is None:
            raise ExtractError("--pool video_mean needs visual tokens; use --pool all_mean or last for titles")
        weights = visual_mask
    elif pool == "all_mean":
        weights = attention_mask.bool()
    else:
        raise ExtractError(f"unknown --pool {pool!r}; expected one of {POOLINGS}")
    counts = weights.sum(dim=1)
    if bool((counts == 0).any()):
        raise RuntimeError(f"{int((counts == 0).sum())} item(s) have no token to pool for {pool}")
    w = weights.to(torch.float32).unsqueeze(-1)
    # Layer by layer (not one stacked [layers, B, S, H] tensor): a 7B model's full stack is ~0.2 GB per item.
    return torch.stack([(h.float() * w).sum(dim=1) / counts[:, None] for h in hidden_states], dim=1)


def _forward_kwargs(model) -> dict:
    """Avoids materialising full-sequence logits: only the last position's (or none at all)."""
    params = inspect.signature(model.forward).parameters
    kwargs = {"output_hidden_states": True, "use_cache": False, "return_dict": True}
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


def _gguf_location(model: str) -> tuple[str, dict]:
    path = Path(model)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ExtractError(f"{path}: GGUF file not found")
        return str(path.parent), {"gguf_file": path.name}
    return model, {}


def _cap_video_pixels(processor, max_pixels: int, model: str) -> None:
    """`--max-pixels`: the video processor's `size["longest_edge"]` (Qwen2/2.5-VL: pixels per frame;
    Qwen3-VL: pixels per clip), the knob that sets how many visual tokens a video costs."""
    size = getattr(getattr(processor, "video_processor", None), "size", None)
    if size is None or getattr(size, "longest_edge", None) is None:
        raise ExtractError(f"{model}: --max-pixels needs a video processor with size['longest_edge'] (Qwen-VL style)")
    size.longest_edge = int(max_pixels)
    if size.shortest_edge and size.shortest_edge > max_pixels:
        size.shortest_edge = int(max_pixels)


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
    ):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.modality, self.prompt, self.device = modality, prompt, device
        try:
            self.processor = AutoProcessor.from_pretrained(model, trust_remote_code=trust_remote_code)
        except (OSError, ValueError, ImportError) as e:
            raise ExtractError(f"{model}: no processor could be loaded ({type(e).__name__}: {e})") from None
        tokenizer = getattr(self.processor, "tokenizer", None)
        if tokenizer is None:
            raise ExtractError(f"{model}: the processor has no tokenizer (not a vision-language model folder?)")
        if modality == "video" and getattr(self.processor, "video_processor", None) is None:
            raise ExtractError(f"{model}: the processor has no video processor; --modality video needs one")
        if modality == "cover" and getattr(self.processor, "image_processor", None) is None:
            raise ExtractError(f"{model}: the processor has no image processor; --modality cover needs one")
        tokenizer.padding_side = "left"
        if max_pixels:
            _cap_video_pixels(self.processor, max_pixels, model)
        try:
            self.model = AutoModelForImageTextToText.from_pretrained(
                model, dtype=_torch_dtype(compute_dtype, device), trust_remote_code=trust_remote_code
            )
        except (OSError, ValueError) as e:
            raise ExtractError(
                f"{model}: cannot load as an image-text-to-text model ({type(e).__name__}: {e})"
            ) from None
        self.model.to(device).eval()
        self._setup(model)

    @classmethod
    def from_parts(cls, model, processor, *, modality: str, prompt: str, device: str) -> VisionLanguageBackend:
        """Wraps an already built model + processor (benchmarks at a real shape with random weights)."""
        self = cls.__new__(cls)
        self.modality, self.prompt, self.device = modality, prompt, device
        self.processor, self.model = processor, model.eval()
        processor.tokenizer.padding_side = "left"
        self._setup(type(model).__name__)
        return self

    def _setup(self, model: str) -> None:
        modality = self.modality
        self.visual_ids = torch.tensor(visual_token_ids(self.model.config, modality), dtype=torch.long)
        if modality != "title" and len(self.visual_ids) == 0:
            raise ExtractError(f"{model}: config has none of {VIDEO_TOKEN_ATTRS + IMAGE_TOKEN_ATTRS}")
        # Qwen3-VL's processor rejects clips shorter than its temporal patch (2 frames); a 1-frame clip
        # is repeated instead (Qwen2-VL pads the same way internally).
        self.min_frames = int(getattr(getattr(self.processor, "video_processor", None), "temporal_patch_size", 1) or 1)
        base = getattr(self.model, "model", self.model)
        # Multimodal-RoPE families (Qwen-VL, GLM-4V) derive positions from the mask themselves.
        self._pass_positions = not hasattr(base, "get_rope_index")
        self._kwargs = _forward_kwargs(self.model)

    def _message(self, sample: Sample) -> list[dict]:
        if self.modality == "title":
            content = [{"type": "text", "text": title_text(sample.item, self.prompt)}]
        else:
            kind = "video" if self.modality == "video" else "image"
            content = [{"type": kind}, {"type": "text", "text": self.prompt}]
        return [{"role": "user", "content": content}]

    def inputs(self, samples: list[Sample]):
        """Processor outputs (left-padded, on the device) for a batch."""
        from transformers.video_utils import VideoMetadata

        texts = [
            self.processor.apply_chat_template(self._message(s), add_generation_prompt=True, tokenize=False)
            for s in samples
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
            kwargs["images"] = [s.image for s in samples]
        return self.processor(**kwargs).to(self.device)

    def hidden_states(self, samples: list[Sample], pool: str) -> torch.Tensor:
        """Pooled states [B, layers + 1, H] float32 (CPU) for a batch; see module docstring.

        Videos with different frame counts go through the model in separate sub-batches: LLaVA-style
        processors stack `pixel_values_videos` and need equal counts within one call.
        """
        groups: dict[int, list[int]] = {}
        for i, s in enumerate(samples):
            groups.setdefault(len(s.clip.frames) if s.clip is not None else 0, []).append(i)
        if len(groups) == 1:
            return self._hidden_states(samples, pool)
        result = [None] * len(samples)
        for idx in groups.values():
            for i, v in zip(idx, self._hidden_states([samples[i] for i in idx], pool)):
                result[i] = v
        return torch.stack(result)

    @torch.inference_mode()
    def _hidden_states(self, samples: list[Sample], pool: str) -> torch.Tensor:
        x = self.inputs(samples)
        extra = {}
        if self._pass_positions:
            extra["position_ids"] = _left_padded_positions(x["attention_mask"])
        out = self.model(**x, **self._kwargs, **extra)
        visual = None
        if self.modality != "title":
            visual = torch.isin(x["input_ids"], self.visual_ids.to(x["input_ids"].device))
        return pool_hidden_states(out.hidden_states, x["attention_mask"], visual, pool).cpu()

    @torch.inference_mode()
    def generate(self, samples: list[Sample], max_new_tokens: int) -> list[str]:
        """One greedy caption per item with the same inputs (paper 4.2, caption-centric)."""
        x = self.inputs(samples)
        out = self.model.generate(**x, max_new_tokens=max_new_tokens, do_sample=False)
        return [
            t.strip() for t in self.processor.batch_decode(out[:, x["input_ids"].shape[1] :], skip_special_tokens=True)
        ]


class TextBackend:
    """`AutoModelForCausalLM` over "Title: <text>\\n<prompt>" (title modality, text-only decoders)."""

    def __init__(self, model: str, *, prompt: str, device: str, compute_dtype: str, trust_remote_code: bool = False):
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
            self.model = AutoModelForCausalLM.from_pretrained(
                location, dtype=_torch_dtype(compute_dtype, device), trust_remote_code=trust_remote_code, **extra
            )
        except (OSError, ValueError) as e:
            raise ExtractError(f"{model}: cannot load as a causal language model ({type(e).__name__}: {e})") from None
        self.model.to(device).eval()
        self._kwargs = _forward_kwargs(self.model)

    def inputs(self, samples: list[Sample]):
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
        out = self.model(**x, position_ids=_left_padded_positions(x["attention_mask"]), **self._kwargs)
        return pool_hidden_states(out.hidden_states, x["attention_mask"], None, pool).cpu()

    @torch.inference_mode()
    def generate(self, samples: list[Sample], max_new_tokens: int) -> list[str]:
        x = self.inputs(samples)
        out = self.model.generate(
            **x, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=self.tokenizer.pad_token_id
        )
        return [
            t.strip() for t in self.tokenizer.batch_decode(out[:, x["input_ids"].shape[1] :], skip_special_tokens=True)
        ]


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
    try:
        config = AutoConfig.from_pretrained(location, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ExtractError(f"{model}: no model config could be loaded ({type(e).__name__}: {e})") from None
    kind = config.model_type
    return kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and kind not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES


def to_storage_bytes(vectors: torch.Tensor, dtype: str) -> bytes:
    """Casts [layers, H] float32 to the storage dtype; raw little-endian bytes for dff_jax.records.

    bfloat16 goes through an int16 view because numpy has no bfloat16 of its own.
    """
    torch_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype]
    t = vectors.to(torch_dtype).contiguous()
    if dtype == "bfloat16":
        t = t.view(torch.int16)
    return t.numpy().tobytes()
