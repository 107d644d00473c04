"""Tiny random checkpoints built offline for the extractor tests (never committed, never downloaded).

Each builder trains a small byte-level BPE tokenizer on the spot with the family's special tokens,
builds the processor from default image/video processors (pixel budgets capped so CPU tests are fast),
a small config, random weights, and `save_pretrained`s everything into a folder that the extractor then
loads by path, exactly like a real checkpoint. The families' recipes follow their processors' and configs' source in transformers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from extract.bench import QWEN_CHAT, QWEN_EXTRA_TOKENS, QWEN_SPECIAL

CORPUS = [
    "A person shoots an arrow at a target. Describe the video in one paragraph.",
    "You are watching a micro-video on a social media platform. Please analyze the video content.",
    "Title: Toy Story (1995). Genres: Animation, Children's, Comedy. Write one coherent paragraph.",
]
LLAVA_CHAT = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>{% elif c['type'] == 'video' %}<video>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _tokenizer(special: list[str], extra: dict, vocab_size: int = 400):
    from extract.bench import train_tokenizer

    return train_tokenizer(special, extra, CORPUS * 20, vocab_size)


def _text_config(tokenizer, ids, **kw):
    cfg = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    cfg.update(kw)
    return cfg


def _save(model, processor, ids, out: Path) -> Path:
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def _qwen_tokenizer():
    tokenizer = _tokenizer(QWEN_SPECIAL, QWEN_EXTRA_TOKENS)
    return tokenizer, {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL}


def build_qwen25_vl(out: Path) -> Path:
    """Qwen2.5-VL: 3 decoder layers, hidden 32 (4 hidden-state rows)."""
    import torch
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    tokenizer, ids = _qwen_tokenizer()
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(max_pixels=56 * 56, min_pixels=28 * 28),
        video_processor=Qwen2VLVideoProcessor(max_pixels=56 * 56, min_pixels=28 * 28),
        tokenizer=tokenizer,
        chat_template=QWEN_CHAT,
    )
    cfg = Qwen2_5_VLConfig(
        text_config=_text_config(
            tokenizer, ids, rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [1, 1, 2]}
        ),
        vision_config=dict(
            depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32, fullatt_block_indexes=[0]
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(0)
    return _save(Qwen2_5_VLForConditionalGeneration(cfg).eval(), processor, ids, out)


def build_qwen3_vl(out: Path) -> Path:
    """Qwen3-VL (timestamps between frames, deepstack): 3 decoder layers, hidden 32."""
    import torch
    from transformers import (
        Qwen2VLImageProcessor,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
        Qwen3VLProcessor,
        Qwen3VLVideoProcessor,
    )

    tokenizer, ids = _qwen_tokenizer()
    processor = Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(patch_size=16, max_pixels=64 * 64, min_pixels=32 * 32),
        video_processor=Qwen3VLVideoProcessor(size={"shortest_edge": 32 * 32, "longest_edge": 4 * 64 * 64}),
        tokenizer=tokenizer,
        chat_template=QWEN_CHAT,
    )
    cfg = Qwen3VLConfig(
        text_config=_text_config(
            tokenizer,
            ids,
            head_dim=8,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 1e4,
                "mrope_section": [1, 1, 2],
                "mrope_interleaved": True,
            },
        ),
        vision_config=dict(
            depth=2,
            hidden_size=16,
            intermediate_size=32,
            num_heads=2,
            out_hidden_size=32,
            deepstack_visual_indexes=[0, 1],
            num_position_embeddings=256,
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(0)
    return _save(Qwen3VLForConditionalGeneration(cfg).eval(), processor, ids, out)


def build_llava_onevision(out: Path) -> Path:
    """LLaVA-OneVision (SigLIP 56 px + Qwen2 LM, `video_token_index`): 3 decoder layers, hidden 32."""
    import torch
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
    )

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]
    tokenizer = _tokenizer(special, {"image_token": "<image>", "video_token": "<video>"})
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in special}
    size = {"height": 56, "width": 56}
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size=size, image_grid_pinpoints=[[56, 56]]),
        video_processor=LlavaOnevisionVideoProcessor(size=size),
        tokenizer=tokenizer,
        chat_template=LLAVA_CHAT,
        num_image_tokens=(56 // 14) ** 2,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_1",
    )
    cfg = LlavaOnevisionConfig(
        vision_config=dict(
            model_type="siglip_vision_model",
            image_size=56,
            patch_size=14,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
        ),
        text_config=dict(model_type="qwen2", **_text_config(tokenizer, ids)),
        image_token_index=ids["<image>"],
        video_token_index=ids["<video>"],
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        image_grid_pinpoints=[[56, 56]],
        vision_aspect_ratio="anyres_max_1",
    )
    torch.manual_seed(0)
    return _save(LlavaOnevisionForConditionalGeneration(cfg).eval(), processor, ids, out)


def build_text_lm(out: Path) -> Path:
    """A Qwen2 causal LM with a chat template: 2 decoder layers, hidden 32 (title modality)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer, ids = _qwen_tokenizer()
    tokenizer.chat_template = QWEN_CHAT
    cfg = Qwen2Config(**_text_config(tokenizer, ids, num_hidden_layers=2))
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def build_text_encoder(
    out: Path, pooling: str = "mean_tokens", normalize: bool = True, max_seq_length: int = 16
) -> Path:
    """A tiny BERT sentence encoder (hidden 24) laid out as a sentence-transformers folder: modules.json
    (Transformer, Pooling, optionally Normalize), 1_Pooling/config.json and sentence_bert_config.json."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(
        CORPUS * 5, trainers.WordPieceTrainer(vocab_size=200, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"])
    )
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))],
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]"
    )
    torch.manual_seed(0)
    model = BertModel(
        BertConfig(
            vocab_size=len(tokenizer), hidden_size=24, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48
        )
    ).eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (out / "modules.json").write_text(json.dumps(modules))
    modes = ["cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens", "weightedmean_tokens", "lasttoken"]
    (out / "1_Pooling").mkdir(exist_ok=True)
    pool_cfg = {"word_embedding_dimension": 24, **{f"pooling_mode_{m}": m == pooling for m in modes}}
    (out / "1_Pooling" / "config.json").write_text(json.dumps(pool_cfg))
    (out / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq_length}))
    return out


BUILDERS = {
    "qwen2_5_vl": build_qwen25_vl,
    "qwen3_vl": build_qwen3_vl,
    "llava_onevision": build_llava_onevision,
    "text_lm": build_text_lm,
    "text_encoder": build_text_encoder,
}


def tiny_checkpoint(tmp_path_factory, kind: str) -> Path:
    """Builds (once per test session, shared by all test files) and returns the folder of a tiny model."""
    root = tmp_path_factory.getbasetemp() / "tiny-checkpoints" / kind
    done = root / ".complete"
    if not done.exists():
        root.mkdir(parents=True, exist_ok=True)
        BUILDERS[kind](root)
        done.write_text("ok")
    return root


def synth_frames(num_frames: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """Smooth moving colour patterns (compress well and survive the codec) as uint8 [T, H, W, 3]."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(0, 1, size=3)
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    frames = []
    for t in range(num_frames):
        phase = t / max(num_frames, 1)
        rgb = np.stack([np.sin(6 * (xx + phase) + base[c] * 6) for c in range(3)], axis=-1)
        frames.append(((rgb * 0.5 + 0.5) * 255).astype(np.uint8))
    return np.stack(frames)


MINICPMV_SPECIAL = QWEN_SPECIAL + ["<image>", "</image>", "<slice>", "</slice>", "<image_id>", "</image_id>"]
MINICPMV_EXTRA = {
    "image_token": "<|image_pad|>",
    "video_token": "<|video_pad|>",
    "image_start_token": "<image>",
    "image_end_token": "</image>",
    "slice_start_token": "<slice>",
    "slice_end_token": "</slice>",
    "image_id_start_token": "<image_id>",
    "image_id_end_token": "</image_id>",
}


def build_minicpmv4_6(out: Path) -> Path:
    """MiniCPM-V 4.6 (native in transformers 5.x: SigLIP-style NaViT tower, window merger, Qwen3.5 hybrid LM with a
    linear-attention and a full-attention layer): 2 decoder layers, hidden 32; 112 px views (4 tokens a view)."""
    import torch
    from transformers import (
        MiniCPMV4_6Config,
        MiniCPMV4_6ForConditionalGeneration,
        MiniCPMV4_6ImageProcessor,
        MiniCPMV4_6Processor,
        MiniCPMV4_6VideoProcessor,
    )

    tokenizer = _tokenizer(MINICPMV_SPECIAL, MINICPMV_EXTRA)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in MINICPMV_SPECIAL}
    views = {"scale_resolution": 112, "max_slice_nums": 2}
    processor = MiniCPMV4_6Processor(
        image_processor=MiniCPMV4_6ImageProcessor(**views),
        video_processor=MiniCPMV4_6VideoProcessor(**views),
        tokenizer=tokenizer,
        chat_template=QWEN_CHAT,
    )
    text = _text_config(
        tokenizer,
        ids,
        model_type="qwen3_5_text",
        num_hidden_layers=2,
        head_dim=8,
        layer_types=["linear_attention", "full_attention"],
        linear_key_head_dim=8,
        linear_value_head_dim=8,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
    )
    cfg = MiniCPMV4_6Config(
        text_config=text,
        vision_config=dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=112,
            patch_size=14,
        ),
        insert_layer_id=0,
        image_size=112,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
    )
    torch.manual_seed(0)
    return _save(MiniCPMV4_6ForConditionalGeneration(cfg).eval(), processor, ids, out)


BUILDERS["minicpmv4_6"] = build_minicpmv4_6
