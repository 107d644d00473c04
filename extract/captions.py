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


class TextEncoder:
    """sentence-transformers-style embedding with plain transformers: mean over real tokens, then L2
    normalisation when the folder's `modules.json` lists a Normalize module (as all-MiniLM-L6-v2 does)."""

    def __init__(self, name: str, device: str = "cpu", max_length: int | None = None):
        from transformers import AutoModel, AutoTokenizer

        self.name, self.device = name, device
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(name)
            self.model = AutoModel.from_pretrained(name, dtype=torch.float32).to(device).eval()
        except (OSError, ValueError) as e:
            raise ExtractError(
                f"--text-encoder {name}: cannot load a tokenizer + encoder ({type(e).__name__}: {e})"
            ) from None
        folder = Path(name)
        self.normalize = False
        self.max_length = max_length or 512
        if (folder / "modules.json").is_file():
            modules = json.loads((folder / "modules.json").read_text())
            self.normalize = any(str(m.get("type", "")).endswith("Normalize") for m in modules)
        if max_length is None and (folder / "sentence_bert_config.json").is_file():
            self.max_length = int(
                json.loads((folder / "sentence_bert_config.json").read_text()).get("max_seq_length", 512)
            )
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if limit:
            self.max_length = min(self.max_length, int(limit))

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @torch.inference_mode()
    def embed(self, texts: list[str]) -> torch.Tensor:
        """[B, 1, H] float32 (CPU): one row per text, the format's "one layer"."""
        x = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        x = x.to(self.device)
        h = self.model(**x).last_hidden_state.float()
        w = x["attention_mask"].unsqueeze(-1).float()
        v = (h * w).sum(1) / w.sum(1).clamp(min=1.0)
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
    raw = path.read_bytes()
    if raw and not raw.endswith(b"\n"):
        # Killed mid-write: only the unterminated tail is incomplete; drop it so appends stay valid.
        cut = raw.rfind(b"\n") + 1
        print(f"note: {path}: dropping an unterminated last line (interrupted run)")
        with open(path, "r+b") as f:
            f.truncate(cut)
        raw = raw[:cut]
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
