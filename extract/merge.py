"""Checks a feature folder for completeness and writes its `schema.json`, `manifest.json`, `failures.jsonl`.

`python -m extract.merge --out DIR [--items ITEMS] [--allow-failures]`. Run after N sharded extractions into
the same folder (a run with `--shard I/N` calls this itself when it finishes, so the last shard to finish
completes the folder). Every item of the list must be written exactly once; an item whose extraction failed
keeps the folder unfinished unless `--allow-failures` is given, and then it is listed (id, stage, reason) in
`manifest.json` and `failures.jsonl` and has no record (the trainer zero-fills it with
`features.allow_missing=True`). Unknown ids, duplicates and inconsistent shapes or dtypes are errors naming
the files. Exit status: 0 complete, 1 incomplete (items neither written nor failed, or failed items without
--allow-failures), 2 invalid folder or options.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from pathlib import Path

from dff_jax import records
from dff_jax.errors import OneLineArgumentParser, one_line
from extract import ExtractError, __version__

RUN_CONFIG = "run_config.json"
ITEM_TEXTS = "item_texts.json"
# Keys every run_config.json this extractor wrote has (the merge reads them to write the schema).
RUN_CONFIG_KEYS = ("model", "modality", "prompt_name", "prompt_text", "pool", "dtype", "num_frames", "items")
# Keys that may differ between the shards of one run: paths differ between hosts.
PER_HOST_KEYS = ("items", "items_format")
# Keys added to the identity after folders were made without them: compared only where recorded.
LATER_KEYS = ("model_files", "text_encoder_files")


@dataclasses.dataclass
class Report:
    """What a feature folder holds relative to its item list."""

    total: int
    written: int
    failed: dict[str, dict]
    missing: list[str]
    shape: tuple[int, int] | None
    dtype: str | None
    allow_failures: bool = False

    @property
    def complete(self) -> bool:
        return not self.missing and (self.allow_failures or not self.failed) and self.shape is not None

    @property
    def blocked_by_failures(self) -> bool:
        """Every item is written or failed, but failed items keep the folder from being finalised."""
        return not self.missing and bool(self.failed) and not self.allow_failures

    @property
    def nothing_written(self) -> bool:
        """Every item failed (with allow_failures): nothing to finalise, and no shard is pending either."""
        return not self.missing and self.shape is None


def scan_shards(out_dir: str | Path) -> tuple[dict[str, str], set, set]:
    """Item ids in every finished shard (-> file name), and the set of shapes and dtypes seen.

    Raises:
      ExtractError: an id that occurs twice (names both files) or a damaged record.
    """
    where: dict[str, str] = {}
    shapes, dtypes = set(), set()
    for path in records.shard_files(out_dir):
        for n, payload in enumerate(records.iter_records(path)):
            try:
                ex = records.Example.FromString(payload).features.feature
                item_id = ex["item_id"].bytes_list.value[0].decode("utf-8")
                shapes.add(tuple(ex["shape"].int64_list.value))
                dtypes.add(ex["dtype"].bytes_list.value[0].decode("utf-8"))
            except Exception as e:
                raise ExtractError(f"{path}: record {n}: not a feature record ({type(e).__name__}: {e})") from None
            if item_id in where:
                raise ExtractError(f"item {item_id!r} is written twice: {where[item_id]} and {path.name}")
            where[item_id] = path.name
    return where, shapes, dtypes


def drop_torn_tail(path: Path) -> bytes:
    """The bytes of a jsonl file a killed run may have left with an unterminated last line; that line is cut off
    the file (with a notice), so that the next append starts a line of its own instead of continuing it."""
    raw = path.read_bytes()
    if raw and not raw.endswith(b"\n"):
        cut = raw.rfind(b"\n") + 1
        print(f"note: {path}: dropping an unterminated last line (interrupted run)")
        with open(path, "r+b") as f:
            f.truncate(cut)
        raw = raw[:cut]
    return raw


def attest(out_dir: Path, prefix: str, name: str, digest: str) -> None:
    """Records that this folder's run wrote part file `name` with these records (`files-<prefix>.jsonl`), before the
    file is renamed into place: a part file without its line came from elsewhere (`check_attested`)."""
    path = Path(out_dir) / f"files-{prefix}.jsonl"
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps({"file": name, "sha256": digest}) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_attested(out_dir: Path) -> dict[str, str] | None:
    """{part file: sha256} over every `files-part-*.jsonl`; None for a folder written before they existed."""
    paths = sorted(Path(out_dir).glob("files-part-*.jsonl"))
    if not paths:
        return None
    attested = {}
    for path in paths:
        lines = drop_torn_tail(path).decode("utf-8").splitlines()
        for lineno, line in enumerate(lines, start=1):
            try:
                rec = json.loads(line)
                attested[str(rec["file"])] = str(rec["sha256"])
            except (ValueError, KeyError, TypeError):
                raise ExtractError(f"{path}: line {lineno}: not a part-file record") from None
    return attested


def check_attested(out_dir: Path, digests: dict[str, str | None], attested: dict[str, str] | None) -> None:
    """Refuses part files no run of this folder wrote ({name: sha256, or None to check the name only}, against
    `read_attested`; None: a folder from before the lists, not checked): a shard file copied in from another
    extraction (without its run config, which the merge would compare) was merged as if it were this run's."""
    if attested is None:
        return
    for name, digest in digests.items():
        if name not in attested or (digest is not None and attested[name] != digest):
            what = "is not one this folder's runs wrote" if name not in attested else "has other records than"
            raise ExtractError(
                f"{Path(out_dir) / name}: this part file {what} (files-part-*.jsonl lists what they wrote): copied "
                "in from another extraction? remove it (its items are then extracted again)"
            )


def read_failures(out_dir: str | Path) -> dict[str, dict]:
    """The latest failure record per item over every `failures-part-*.jsonl`."""
    latest: dict[str, dict] = {}
    for path in sorted(Path(out_dir).glob("failures-part-*.jsonl")):
        lines = path.read_text(encoding="utf-8").splitlines()
        for lineno, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                item_id = str(rec["item_id"])
            except (json.JSONDecodeError, KeyError, TypeError):
                if lineno == len(lines):
                    continue  # a torn last line from a killed run
                raise ExtractError(f"{path}: line {lineno}: not a failure record") from None
            if item_id not in latest or rec.get("time", 0) >= latest[item_id].get("time", 0):
                latest[item_id] = rec
    return latest


def read_run_config(out_dir: str | Path) -> dict:
    path = Path(out_dir) / RUN_CONFIG
    if not path.is_file():
        raise ExtractError(f"{path}: missing; is {out_dir} an extractor output folder?")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ExtractError(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from None
    check_run_config_object(path, cfg)
    return cfg


def check_run_config_object(path: Path, cfg) -> None:
    """Valid JSON is not enough: a list, or an object without the keys this extractor writes, is not a run config."""
    if not isinstance(cfg, dict):
        raise ExtractError(f"{path}: expected the JSON object this extractor writes (found a {type(cfg).__name__})")
    missing = [k for k in RUN_CONFIG_KEYS if k not in cfg]
    if missing:
        raise ExtractError(f"{path}: expected the JSON object this extractor writes (missing {', '.join(missing)})")


def check_shard_configs(out_dir: Path, cfg: dict) -> None:
    """Each shard manifest records the run config its shard was extracted under; a shard copied in from another
    run (another prompt, pooling, model...) would mix two extractions in one feature set. Manifests written
    before this was recorded have none and are not checked."""
    for path in sorted(out_dir.glob("manifest-part-*.json")):
        try:
            theirs = json.loads(path.read_text()).get("run_config")
        except (OSError, ValueError, AttributeError):
            continue  # a manifest is informational; a damaged one says nothing about the records
        if not isinstance(theirs, dict):
            continue
        keys = [k for k in cfg if k in theirs and k not in PER_HOST_KEYS]
        diff = [f"{k} {theirs[k]!r} vs {cfg[k]!r}" for k in keys if theirs[k] != cfg[k]]
        if diff:
            raise ExtractError(
                f"{path}: this shard was extracted by another run ({'; '.join(diff[:4])} in {RUN_CONFIG}); "
                "remove its part files or merge it into its own folder"
            )


MERGED = (records.SCHEMA_FILE, "manifest.json", "failures.jsonl")


def finalize(out_dir: str | Path, item_ids: list[str], *, allow_failures: bool = False, write: bool = True) -> Report:
    """Checks the folder against `item_ids`; when complete, writes schema/manifest/failures (atomically).

    Args:
      out_dir: the feature folder (with run_config.json and part-*.tfrecord shards).
      item_ids: the full item list (all shards).
      allow_failures: finalise a folder whose only unwritten items are failed ones (they are listed in
        manifest.json and failures.jsonl); without it such a folder stays unfinished.
      write: write the merged files when complete. When not complete, merged files left by an earlier
        finalisation that no longer match the records (a rerun added items) are removed, so a stale
        schema.json is never read as describing the folder.
    """
    out_dir = Path(out_dir)
    cfg = read_run_config(out_dir)
    try:
        where, shapes, dtypes = scan_shards(out_dir)  # a damaged shard too: the merged files no longer describe it
        _check_records(out_dir, cfg, where, set(item_ids), shapes, dtypes)
    except (ExtractError, records.RecordError):
        if write:  # merged files that contradict the records must not outlive the error
            _remove_stale_merged(out_dir, None)
        raise
    known = set(item_ids)
    failures = {k: v for k, v in read_failures(out_dir).items() if k not in where and k in known}
    missing = [i for i in item_ids if i not in where and i not in failures]
    shape = next(iter(shapes)) if shapes else None
    dtype = next(iter(dtypes)) if dtypes else None
    report = Report(len(item_ids), len(where), failures, missing, shape, dtype, allow_failures)
    if write and not report.complete:
        _remove_stale_merged(out_dir, report.written)
    if not write or not report.complete or shape is None:
        return report
    # Every record read once more: the trainer checks each shard against these (dff_jax.records), and each must be
    # a file this folder's runs wrote.
    digests = {path.name: records.shard_digest(path) for path in records.shard_files(out_dir)}
    try:
        check_attested(out_dir, digests, read_attested(out_dir))
    except ExtractError:
        _remove_stale_merged(out_dir, None)
        raise
    if cfg.get("captions"):
        from extract.captions import merge_captions

        merge_captions(out_dir, item_ids)
    with open(out_dir / "failures.jsonl.tmp", "w", encoding="utf-8") as f:
        for item_id in item_ids:
            if item_id in failures:
                f.write(json.dumps(failures[item_id], ensure_ascii=False) + "\n")
    (out_dir / "failures.jsonl.tmp").replace(out_dir / "failures.jsonl")
    schema = records.Schema(
        model=cfg["schema_model"],
        layers=int(shape[0]),
        hidden_size=int(shape[1]),
        dtype=report.dtype,
        pooling=cfg["schema_pooling"],
        prompt=cfg["prompt_text"],
        modality=cfg["modality"],
        num_frames=int(cfg["num_frames"]),
        extractor_version=__version__,
        num_items=report.written,
        extra={
            "prompt_name": cfg["prompt_name"],
            "failed_items": len(failures),
            "item_list": cfg.get("items"),
            **cfg.get("schema_extra", {}),
            records.SHARD_DIGESTS: digests,
        },
    )
    records.write_schema(out_dir, schema)
    shards = [json.loads(p.read_text()) for p in sorted(out_dir.glob("manifest-part-*.json"))]
    records.write_json_atomic(
        out_dir / "manifest.json",
        {
            "complete": True,
            "merged_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "items_in_list": len(item_ids),
            "items_written": report.written,
            "items_failed": len(failures),
            "allow_failures": allow_failures,
            # The items without a record (zero-filled by the trainer with features.allow_missing=True).
            "failed_items": [
                {k: failures[i].get(k) for k in ("item_id", "stage", "reason")} for i in item_ids if i in failures
            ],
            "shape": list(shape),
            "dtype": report.dtype,
            "files": sorted(set(where.values())),
            "run_config": cfg,
            "shards": shards,
        },
    )
    return report


def create_exclusive(path: Path, obj) -> bool:
    """Writes a new JSON file unless one exists (False then). A hard link is created atomically or not at all, so
    of two first runs with different options (run_config.json) or lists (item_texts.json) only one defines the
    folder; the other then compares."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        records.write_json_atomic(tmp, obj)
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


def reads_texts(cfg) -> bool:
    """Whether a run embeds its items' texts (title modality, title captions) rather than their media: `cfg` is
    a run_config.json or the run's options (`vars(opts)`)."""
    return cfg.get("modality") == "title" or bool(cfg.get("captions") and cfg.get("caption_source") == "title")


def check_item_texts(out_dir: Path, items: list, items_path, record: bool) -> None:
    """For runs that embed the items' texts: each id's text must be the one the folder was extracted with, whatever
    the list's path on this host (`items` is per host). `item_texts.json` holds {id: sha256 of its text} over every
    list the folder's runs were given; `record`: a run's list that adds ids extends it (the merge only compares)."""
    given = {it.item_id: hashlib.sha256(it.text.encode("utf-8")).hexdigest()[:32] for it in items}
    path = Path(out_dir) / ITEM_TEXTS
    if record and not path.exists() and create_exclusive(path, given):
        return
    if path.exists():
        try:
            recorded = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise ExtractError(f"{path}: not valid JSON ({e}); it records the folder's item texts") from None
        if not isinstance(recorded, dict):
            raise ExtractError(f"{path}: expected an object {{item id: text digest}}")
        changed = [it for it in items if recorded.get(it.item_id, given[it.item_id]) != given[it.item_id]]
        if changed:
            raise ExtractError(
                f"{items_path}: line {changed[0].line}: item {changed[0].item_id!r} has another text than the one "
                f"this folder was extracted with ({len(changed)} such item(s); {path}): this folder is another "
                "item list's: use another --out"
            )
        if not record or given.keys() <= recorded.keys():
            return
        given = {**recorded, **given}
    if record:
        records.write_json_atomic(path, given)


def check_known_ids(out_dir: Path, written, known: set, what: str = "the item list", advice: str = "") -> None:
    """Refuses records of ids `known` lacks: the folder holds another item list's items (merge, and a resume)."""
    unknown = sorted(set(written) - known)
    if unknown:
        raise ExtractError(
            f"{out_dir}: holds {len(unknown)} written item(s) not in {what} (e.g. {unknown[:3]}){advice}"
        )


def _check_records(out_dir: Path, cfg: dict, where: dict, known: set, shapes: set, dtypes: set) -> None:
    check_known_ids(out_dir, where, known)
    if len(shapes) > 1 or len(dtypes) > 1:
        raise ExtractError(f"{out_dir}: shards disagree on shape {sorted(shapes)} or dtype {sorted(dtypes)}")
    check_shard_configs(out_dir, cfg)


def _remove_stale_merged(out_dir: Path, written: int | None) -> None:
    """Removes the merged files unless schema.json's item count is `written` (None: remove them regardless)."""
    try:
        num_items = json.loads((out_dir / records.SCHEMA_FILE).read_text()).get("num_items")
    except (OSError, ValueError, AttributeError):
        return
    if num_items != written:
        for name in MERGED:
            (out_dir / name).unlink(missing_ok=True)


def failures_message(out_dir: str | Path, report: Report, flag: str = "--allow-failures") -> str:
    """One line: why a folder whose items are all written or failed is not finalised, and the two ways out."""
    shown = "; ".join(
        f"{item_id} ({rec.get('stage')}: {_first_line(rec.get('reason'))})"
        for item_id, rec in list(report.failed.items())[:3]
    )
    more = f" and {len(report.failed) - 3} more" if len(report.failed) > 3 else ""
    return (
        f"{out_dir}: {len(report.failed)} item(s) failed: {shown}{more} (all in failures-part-*.jsonl); the folder "
        f"is not finalised: fix the cause and rerun the same command to retry them, or pass {flag} to finalise "
        "without them (listed in manifest.json; the trainer zero-fills them with features.allow_missing=True)"
    )


def nothing_written_message(out_dir: str | Path, report: Report) -> str:
    """One line: every item failed, so even --allow-failures has nothing to finalise."""
    shown = "; ".join(
        f"{item_id} ({rec.get('stage')}: {_first_line(rec.get('reason'))})"
        for item_id, rec in list(report.failed.items())[:3]
    )
    return (
        f"{out_dir}: all {len(report.failed)} item(s) failed ({shown}; all in failures-part-*.jsonl); nothing to "
        "finalise: fix the cause and rerun the same command"
    )


def _first_line(text, limit: int = 160) -> str:
    line = str(text).strip().splitlines()[0] if str(text).strip() else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def describe(report: Report) -> str:
    lines = [
        f"{report.written}/{report.total} items written, {len(report.failed)} failed, {len(report.missing)} missing"
    ]
    if report.shape:
        lines.append(f"per-item array {list(report.shape)} {report.dtype}")
    elif not report.missing:
        lines.append("no item was written: nothing to finalise")
    if report.missing:
        lines.append(f"missing (neither written nor failed), first ones: {report.missing[:10]}")
    for item_id, rec in list(report.failed.items())[:10]:
        lines.append(f"failed {item_id}: {rec.get('reason')}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = OneLineArgumentParser(prog="python -m extract.merge", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="the feature folder the shards were written to")
    parser.add_argument("--items", help="item list (default: the one recorded in run_config.json)")
    parser.add_argument("--items-format", default=None, help="auto|csv|microlens|movielens")
    parser.add_argument(
        "--allow-failures",
        action="store_true",
        help="finalise although some items failed (listed in manifest.json; they get no record)",
    )
    parser.add_argument(
        "--strict", action="store_true", help="(the default now: failed items keep the folder unfinished)"
    )
    args = parser.parse_args(argv)
    from extract.items import read_items

    if args.strict and args.allow_failures:
        print("error: --strict and --allow-failures contradict each other; give one", file=sys.stderr)
        return 2
    try:
        cfg = read_run_config(args.out)
        items_path = args.items or cfg["items"]
        items = read_items(items_path, args.items_format or cfg.get("items_format", "auto"))
        if reads_texts(cfg):
            check_item_texts(Path(args.out), items, items_path, record=False)
        report = finalize(args.out, [i.item_id for i in items], allow_failures=args.allow_failures)
    except (ExtractError, records.RecordError) as e:
        print(f"error: {one_line(str(e))}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {e.filename}: {e.strerror}" if e.filename else f"error: {e}", file=sys.stderr)
        return 2
    print(describe(report))
    if report.complete:
        print("complete: schema.json, manifest.json, failures.jsonl written")
    elif report.blocked_by_failures:
        print("INCOMPLETE: " + failures_message(args.out, report))
    else:
        print("INCOMPLETE")
    return 0 if report.complete else 1


if __name__ == "__main__":
    sys.exit(main())
