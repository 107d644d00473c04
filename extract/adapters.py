"""Adapters: models outside the generic transformers path, behind the same backend interface.

An adapter is any object with

    hidden_states(samples: list[models.Sample], pool: str) -> torch.Tensor  # [B, layers + 1, H] float32, CPU
    generate(samples: list[models.Sample], max_new_tokens: int) -> list[str]  # for --captions

and a constructor `Adapter(model: str, *, modality, num_frames, prompt, device, compute_dtype,
trust_remote_code)`. `--adapter minicpmv` picks the built-in MiniCPM-V 2.6 / 4.5 adapter (also chosen
automatically for a folder or hub id whose config says `model_type: minicpmv` or whose `auto_map` names MiniCPMV
classes); `--adapter package.module:Class`
loads a user's adapter, e.g. for Video-LaVIT (contract below). Everything else in a run (decoding,
batching, pooling names, record shards, resume, manifest) is shared.

Video-LaVIT adapter contract (paper section 3; its code lives in github.com/jy0205/LaVIT, VideoLaVIT/,
weights rain1011/Video-LaVIT-v1; it needs its own venv: transformers==4.33.2, an ffmpeg binary and
`motion-vector-extractor`; see extract/README.md). A user's class must:

1. build the runner from the repository (`VideoLaVITUnderstandingRunner(model_path, model_dtype="bf16",
   max_clips=8)`), never via trust_remote_code;
2. take its *own* video input from the mp4 path (`sample.item.item_id` + the media folder): I-frame
   keyframes plus motion vectors of 24-frame clips, not our 16 uniform frames (`Sample.clip` is ignored);
3. run the language model with `output_hidden_states=True` and the video spliced in at the placeholder
   (`VIDEO_TOKEN_INDEX = -201`), returning all 33 states (LLaMA-2-7B: 32 layers + embeddings, 4096);
4. pool "video_mean" over the spliced visual + motion positions: placeholder index + the length of
   `model.encode_visual_features(images)[0]`; "last" and "all_mean" as in extract.models;
5. return float32 CPU tensors `[B, 33, 4096]`; casting and writing are done by the run.
"""

from __future__ import annotations

import importlib
import inspect
import json
from pathlib import Path

import numpy as np
import torch

from extract import ExtractError
from extract.models import MINICPMV_NATIVE, LayerPooler, Sample, _torch_dtype, dtype_key


def config_file(model: str) -> Path | None:
    """The config.json of a local folder, or of a hub id from the local hub cache (downloaded there when not
    cached and the hub is reachable; offline-safe otherwise: None)."""
    folder = Path(model)
    if folder.is_dir():
        path = folder / "config.json"
        return path if path.is_file() else None
    if folder.suffix == ".gguf" or model.count("/") != 1:
        return None
    try:
        from huggingface_hub import hf_hub_download, try_to_load_from_cache

        cached = try_to_load_from_cache(model, "config.json")
        if isinstance(cached, str):
            return Path(cached)
        if cached is not None:  # the cache records that the repo has no such file
            return None
        return Path(hf_hub_download(model, "config.json"))
    except Exception:  # offline, gated, unknown repo: the loaders below give the real error message
        return None


def detect(model: str | None, trust_remote_code: bool = False) -> str | None:
    """The built-in adapter a model needs, from its config.json's model_type / auto_map (None: generic path).

    MiniCPM-V 2.6 and 4.5 ship their own code (`model_type: minicpmv`, `auto_map` naming MiniCPMV classes);
    4.6 and 4.7 are native in transformers (model_type minicpmv4_6 / minicpmv4_7) and take the generic path.
    """
    if not model:
        return None
    config = config_file(model)
    if config is None:
        return None
    try:
        cfg = json.loads(config.read_text())
    except json.JSONDecodeError as e:
        raise ExtractError(f"{config}: line {e.lineno}: not valid JSON ({e.msg})") from None
    kind = cfg.get("model_type")
    auto_map = " ".join(str(v) for v in (cfg.get("auto_map") or {}).values())
    if kind == "minicpmv" or (kind not in MINICPMV_NATIVE and "MiniCPMV" in auto_map):
        return "minicpmv"
    return None


def remote_load_kwargs(compute_dtype: str, device: str) -> dict:
    """`from_pretrained` arguments the installed transformers accepts for remote-code models."""
    return {dtype_key(): _torch_dtype(compute_dtype, device), "attn_implementation": "sdpa"}


def load_adapter(name: str, model: str, **kwargs):
    """Instantiates a built-in adapter by name or a user adapter given as `module:Class`."""
    if name == "minicpmv":
        return MiniCPMVAdapter(model, **kwargs)
    if ":" not in name:
        raise ExtractError(f"unknown --adapter {name!r}; expected minicpmv or package.module:ClassName")
    module_name, class_name = name.split(":", 1)
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as e:
        raise ExtractError(f"--adapter {name}: cannot import ({type(e).__name__}: {e})") from None
    adapter = cls(model, **kwargs)
    for method in ("hidden_states", "generate"):
        if not callable(getattr(adapter, method, None)):
            raise ExtractError(f"--adapter {name}: the adapter has no {method}() method (see extract/adapters.py)")
    return adapter


class MiniCPMVAdapter:
    """MiniCPM-V 2.6 (SigLIP-400M + Qwen2-7B) and 4.5 (SigLIP2 + 3D resampler + Qwen3-8B) via their remote code.

    Frames go in as a list of PIL images followed by the prompt, as in the model cards' video example
    (`use_image_id=False`, `max_slice_nums=1`); 4.5 additionally gets `temporal_ids` (frame times in
    0.1 s units, packed `pack_frames` frames per group, as its 3D resampler expects). The hidden states
    come from the remote model's own embedding merge (`get_vllm_embedding`) followed by its language
    model, each layer pooled as produced (`LayerPooler`); "video_mean" pools over the union of `image_bound`
    ranges.

    The remote code was written for transformers 4.x (2.6: 4.40.2); `remote_load_kwargs` passes the dtype
    argument the installed version accepts. Written against the published remote code; not run here (no
    weights on the build machine): what is tested is its selection and its refusal without the flag.
    """

    TIME_SCALE = 0.1

    def __init__(
        self,
        model: str,
        *,
        modality: str,
        num_frames: int,
        prompt: str,
        device: str,
        compute_dtype: str,
        trust_remote_code: bool = False,
        pack_frames: int = 6,
    ):
        if not trust_remote_code:
            raise ExtractError(
                f"{model}: MiniCPM-V 2.6/4.5 run their own code from the checkpoint; pass --trust-remote-code"
            )
        if modality == "title":
            raise ExtractError("the MiniCPM-V adapter handles video and cover; use a text model for titles")
        from transformers import AutoModel, AutoProcessor, AutoTokenizer

        self.modality, self.prompt, self.device, self.pack_frames = modality, prompt, device, pack_frames
        self.tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=True)
        self.processor = AutoProcessor.from_pretrained(model, trust_remote_code=True)
        self.model = AutoModel.from_pretrained(
            model, trust_remote_code=True, **remote_load_kwargs(compute_dtype, device)
        )
        self.model.to(device).eval()
        self.pooler = None
        # MiniCPM-V 4.5's processor takes temporal_ids (3D resampler); 2.6's does not.
        self.takes_temporal_ids = "temporal_ids" in inspect.signature(self.processor.__call__).parameters

    def _frames(self, sample: Sample):
        from PIL import Image

        if sample.clip is not None:
            return [Image.fromarray(f) for f in sample.clip.frames]
        return [Image.fromarray(sample.image)]

    def _inputs(self, samples: list[Sample]):
        texts, images, temporal = [], [], []
        for s in samples:
            frames = self._frames(s)
            placeholder = "\n".join(["(<image>./</image>)"] * len(frames))
            msgs = [{"role": "user", "content": placeholder + "\n" + self.prompt}]
            texts.append(self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))
            images.append(frames)
            if s.clip is not None:
                ids = [int(round(t / self.TIME_SCALE)) for t in s.clip.timestamps]
                temporal.append([ids[i : i + self.pack_frames] for i in range(0, len(ids), self.pack_frames)])
        kwargs = dict(max_slice_nums=1, use_image_id=False, return_tensors="pt", max_length=32768)
        if self.takes_temporal_ids and temporal:
            kwargs["temporal_ids"] = temporal
        x = self.processor(texts, images, **kwargs).to(self.device)
        data = {k: x[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_bound", "tgt_sizes") if k in x}
        if "temporal_ids" in x:
            data["temporal_ids"] = x["temporal_ids"]
        data["position_ids"] = (data["attention_mask"].long().cumsum(-1) - 1).clamp(min=0)
        return data

    @torch.inference_mode()
    def hidden_states(self, samples: list[Sample], pool: str) -> torch.Tensor:
        data = self._inputs(samples)
        embeds, _ = self.model.get_vllm_embedding(data)
        seq = data["input_ids"].shape[1]
        visual = torch.zeros((len(samples), seq), dtype=torch.bool, device=embeds.device)
        for row, bounds in enumerate(data["image_bound"]):
            for start, end in np.asarray(torch.as_tensor(bounds).cpu()).reshape(-1, 2):
                visual[row, int(start) : int(end)] = True
        if self.pooler is None:
            # The remote model's language model is a plain Qwen2/Qwen3 causal LM: its decoder layers are hooked
            # like the generic path's (layer 0 input, each layer's output, the final norm's output last).
            self.pooler = LayerPooler(self.model.llm)
        return self.pooler.run(
            lambda: self.pooler.decoder(
                inputs_embeds=embeds,
                attention_mask=data["attention_mask"],
                position_ids=data["position_ids"],
                use_cache=False,
            ),
            data["attention_mask"],
            visual,
            pool,
        ).cpu()

    @torch.inference_mode()
    def generate(self, samples: list[Sample], max_new_tokens: int) -> list[str]:
        captions = []
        for s in samples:
            msgs = [{"role": "user", "content": self._frames(s) + [self.prompt]}]
            captions.append(
                self.model.chat(
                    image=None,
                    msgs=msgs,
                    tokenizer=self.tokenizer,
                    sampling=False,
                    max_new_tokens=max_new_tokens,
                    use_image_id=False,
                    max_slice_nums=1,
                ).strip()
            )
        return captions
