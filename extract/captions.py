"""Caption-centric features (paper section 4.2): generated captions, embedded by a text encoder.

"Caption-Centric (CC): ... the LVLM is used as a sophisticated caption generator. Given a prompt, it
produces a descriptive textual narrative of the video content. This generated caption is then encoded
into a fixed-dimensional vector e^c using a state-of-the-art text encoder." The captions are kept in
`captions-part-*.jsonl` (merged into `captions.jsonl`), one JSON object per line, so a resumed run reuses
them; the vectors are a one-row feature set in the same record format as the hidden states.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from extract import ExtractError
from extract.models import check_location, dtype_key, load_weights

# sentence-transformers Pooling modes this encoder reproduces (1_Pooling/config.json keys).
POOLING_MODES = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_lasttoken": "lasttoken",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
}
KNOWN_MODULES = ("Transformer", "Pooling", "Normalize")


def st_file(name: str, relpath: str) -> Path | None:
    """A sentence-transformers file of a local folder, or of a hub id through the hub cache (fetched into it
    when missing and the hub is reachable); None when the model has no such file or it cannot be had."""
    folder = Path(name)
    if folder.is_dir():
        path = folder / relpath
        return path if path.is_file() else None
    try:
        from huggingface_hub import hf_hub_download, try_to_load_from_cache

        cached = try_to_load_from_cache(name, relpath)
        if isinstance(cached, str):
            return Path(cached)
        if cached is not None:  # the cache records that the repo has no such file
            return None
        return Path(hf_hub_download(name, relpath))
    except Exception:  # not in the repo, or offline: the caller decides what that means
        return None


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ExtractError(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from None


def sentence_transformers_settings(name: str) -> dict:
    """(pooling, normalize, max_length) from a sentence-transformers model's modules.json, 1_Pooling/config.json
    and sentence_bert_config.json; a model without modules.json is a plain encoder (mean pooling, no
    normalisation). Raises ExtractError for modules or poolings this encoder cannot reproduce."""
    modules_path = st_file(name, "modules.json")
    settings = {"pooling": "mean", "normalize": False, "max_length": None, "source": "plain transformers (mean)"}
    if modules_path is None:
        return settings
    settings["source"] = "sentence-transformers modules.json"
    modules = _read_json(modules_path)
    for m in modules:
        kind = str(m.get("type", "")).rsplit(".", 1)[-1]
        if kind not in KNOWN_MODULES:
            raise ExtractError(
                f"--text-encoder {name}: {modules_path}: module {m.get('name')!r} is a {kind}, which this encoder "
                f"does not reproduce (supported: {', '.join(KNOWN_MODULES)}); use sentence-transformers itself"
            )
        if kind == "Normalize":
            settings["normalize"] = True
        if kind == "Pooling":
            rel = f"{m.get('path') or '1_Pooling'}/config.json"
            pooling_path = st_file(name, rel)
            if pooling_path is None:
                raise ExtractError(f"--text-encoder {name}: modules.json lists a Pooling module but {rel} is missing")
            cfg = _read_json(pooling_path)
            modes = [k for k, v in cfg.items() if k.startswith("pooling_mode_") and v]
            if len(modes) != 1 or modes[0] not in POOLING_MODES:
                raise ExtractError(
                    f"--text-encoder {name}: {pooling_path}: pooling {modes} is not one of the modes this encoder "
                    f"reproduces ({', '.join(POOLING_MODES)}, one at a time)"
                )
            if cfg.get("include_prompt", True) is False:
                raise ExtractError(f"--text-encoder {name}: {pooling_path}: include_prompt=false is not supported")
            settings["pooling"] = POOLING_MODES[modes[0]]
    bert_cfg = st_file(name, "sentence_bert_config.json")
    if bert_cfg is not None:
        settings["max_length"] = _read_json(bert_cfg).get("max_seq_length")
    return settings


class TextEncoder:
    """sentence-transformers embeddings with plain transformers: the model's own pooling (mean, CLS, max,
    last token), max sequence length and L2 normalisation, read from its sentence-transformers files whether
    `name` is a folder or a hub id (`sentence_transformers_settings`)."""

    def __init__(self, name: str, device: str = "cpu", max_length: int | None = None):
        from transformers import AutoModel, AutoTokenizer

        self.name, self.device = name, device
        check_location("--text-encoder", name)
        st = sentence_transformers_settings(name)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(name)
            # The pooler head (BERT's CLS dense layer) is never used: pooling is sentence-transformers' own.
            encoder = load_weights(
                AutoModel, name, f"--text-encoder {name}", ("pooler.",), **{dtype_key(): torch.float32}
            )
            self.model = encoder.to(device).eval()
        except (OSError, ValueError) as e:
            raise ExtractError(
                f"--text-encoder {name}: cannot load a tokenizer + encoder ({type(e).__name__}: {e})"
            ) from None
        self.pooling, self.normalize = st["pooling"], st["normalize"]
        self.max_length = int(max_length or st["max_length"] or 512)
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if limit:
            self.max_length = min(self.max_length, int(limit))
        if st["source"].startswith("plain"):
            print(f"note: --text-encoder {name}: no sentence-transformers modules.json; mean pooling, not normalised")
        self.settings = {"pooling": self.pooling, "normalize": self.normalize, "max_length": self.max_length}

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @torch.inference_mode()
    def embed(self, texts: list[str]) -> torch.Tensor:
        """[B, 1, H] float32 (CPU): one row per text, the format's "one layer"."""
        x = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        x = x.to(self.device)
        h = self.model(**x).last_hidden_state.float()
        mask = x["attention_mask"]
        w = mask.unsqueeze(-1).float()
        if self.pooling == "cls":
            v = h[:, 0]
        elif self.pooling == "max":
            v = h.masked_fill(w == 0, float("-inf")).max(dim=1).values
        elif self.pooling == "lasttoken":
            # The last real token of each row, with either padding side.
            last = mask.shape[1] - 1 - mask.flip(1).long().argmax(dim=1)
            v = h[torch.arange(h.shape[0], device=h.device), last]
        else:
            v = (h * w).sum(1) / w.sum(1).clamp(min=1.0)
            if self.pooling == "mean_sqrt_len":
                v = v * w.sum(1).clamp(min=1.0) / w.sum(1).clamp(min=1.0).sqrt()
        if self.normalize:
            v = torch.nn.functional.normalize(v, dim=-1)
        return v[:, None, :].cpu()


def read_captions(path: str | Path) -> dict[str, str]:
    """Reads a captions jsonl file; a torn last line (a killed run) is cut off and ignored, with a notice.

    Raises:
      ExtractError: on a malformed line that is not the last one.
    """
    path = Path(path)
    if not path.is_file():
        return {}
    from extract.merge import drop_torn_tail

    raw = drop_torn_tail(path)  # killed mid-write: only the unterminated tail is incomplete
    captions = {}
    for lineno, line in enumerate(raw.decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            captions[str(rec["item_id"])] = str(rec["caption"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ExtractError(f'{path}: line {lineno}: expected {{"item_id": ..., "caption": ...}} ({e})') from None
    return captions


def append_captions(path: str | Path, records: list[tuple[str, str]]) -> None:
    """Appends (item_id, caption) lines and fsyncs, so a caption is generated once even across crashes."""
    with open(path, "a", encoding="utf-8") as f:
        f.writelines(
            json.dumps({"item_id": item_id, "caption": caption}, ensure_ascii=False) + "\n"
            for item_id, caption in records
        )
        f.flush()
        os.fsync(f.fileno())


def merge_captions(out_dir: str | Path, order: list[str]) -> Path:
    """Writes `captions.jsonl` from every shard's captions file, in item-list order (atomic)."""
    out_dir = Path(out_dir)
    merged: dict[str, str] = {}
    for part in sorted(out_dir.glob("captions-part-*.jsonl")):
        merged.update(read_captions(part))
    path = out_dir / "captions.jsonl"
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for item_id in order:
            if item_id in merged:
                f.write(json.dumps({"item_id": item_id, "caption": merged[item_id]}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path
