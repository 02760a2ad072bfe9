#!/usr/bin/python3.11
"""dicom-reader INPUT_DIR [OUTPUT_DIR]: what a staged DICOM study holds, file by file.

The first job a newcomer runs on medhive (image `medhive/dicom-reader:1`). It shows
that the container sees every file exactly as the archive holds it (its SHA-256,
compressed or not) and what its header says, without decoding a pixel: one line of
`key=value` fields per file under INPUT_DIR, sorted by path, then one per series, and,
given OUTPUT_DIR, the same as `summary.json` there for the user to download. A file
that is not DICOM is reported as such and the reading goes on: one stray file must not
hide the rest of a study.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.errors import InvalidDicomError

#: The attributes read from each data set (pydicom skips every other element); the
#: first ones are reported as they are.
AS_IS = ["PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "Modality"]
TAGS = [*AS_IS, "SOPClassUID", "Rows", "Columns", "NumberOfFrames"]
#: Printed by name only; the summary has both the names and the UIDs.
SUMMARY_ONLY = ("SOPClassUID", "TransferSyntaxUID")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def read(path: Path, name: str) -> dict[str, Any]:
    """One file's record: its path and hash, and its header if it is a DICOM file."""
    record: dict[str, Any] = {"path": name}
    try:
        record["sha256"] = sha256(path)
        ds = dcmread(path, stop_before_pixels=True, specific_tags=TAGS)
    except InvalidDicomError:
        return {**record, "dicom": False, "reason": "not a DICOM file (no DICM prefix)"}
    except Exception as exc:  # unreadable or damaged in any way: say so, read the next
        return {**record, "dicom": False, "reason": f"unreadable: {exc!r}"}
    if "SOPInstanceUID" not in ds:  # a Part 10 header and no instance: cut short, or a DICOMDIR
        return {**record, "dicom": False, "reason": "DICOM header but no SOP instance"}
    syntax, sop_class = ds.file_meta.get("TransferSyntaxUID"), ds.get("SOPClassUID")
    try:
        compressed = syntax.is_compressed if syntax else None
    except ValueError:  # a private syntax pydicom does not know
        compressed = None
    return {
        **record,
        "dicom": True,
        **{tag: str(ds.get(tag, "")) for tag in AS_IS},
        "SOPClass": sop_class.name if sop_class else "",
        "SOPClassUID": str(sop_class or ""),
        "TransferSyntax": syntax.name if syntax else "",
        "TransferSyntaxUID": str(syntax or ""),
        "compressed": compressed,
        "Rows": ds.get("Rows"),
        "Columns": ds.get("Columns"),
        "NumberOfFrames": int(ds.get("NumberOfFrames") or 1),  # absent: one frame
    }


def by_series(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The DICOM files' records grouped by series, in the order they were read."""
    series: dict[str, dict[str, Any]] = {}
    for record in (r for r in records if r["dicom"]):
        keys = ("SeriesInstanceUID", "StudyInstanceUID", "PatientID", "Modality")
        entry = series.setdefault(record["SeriesInstanceUID"], {k: record[k] for k in keys})
        entry.setdefault("instances", []).append(record)
    for entry in series.values():
        entry["frames"] = sum(i["NumberOfFrames"] for i in entry["instances"])
        entry["TransferSyntaxes"] = sorted({i["TransferSyntax"] for i in entry["instances"]})
    return list(series.values())


def word(value: object) -> str:
    """A value in a `key=value` line: yes/no/unknown for a flag, quoted if it has spaces."""
    if value is None or isinstance(value, bool):
        return {True: "yes", False: "no", None: "unknown"}[value]
    text = str(value)
    plain = text.isprintable() and text and not set(text) & set(' "=')
    return text if plain else json.dumps(text)


def line(**values: object) -> str:
    return " ".join(f"{key}={word(value)}" for key, value in values.items())


def main(args: list[str]) -> int:
    if len(args) not in (1, 2):
        sys.exit("usage: dicom-reader INPUT_DIR [OUTPUT_DIR]")
    if not Path(args[0]).is_dir():
        sys.exit(f"dicom-reader: {args[0]} is not a directory")
    # Line by line, so that the job's log shows how far the reading got.
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    root = Path(args[0])
    names = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    records = []
    for name in names:
        records.append(record := read(root / name, name))
        print(line(**{k: v for k, v in record.items() if k not in SUMMARY_ONLY}))
    series = by_series(records)
    for s in series:
        print(line(series=s["SeriesInstanceUID"], PatientID=s["PatientID"],
                   StudyInstanceUID=s["StudyInstanceUID"], Modality=s["Modality"],
                   instances=len(s["instances"]), frames=s["frames"],
                   TransferSyntax=", ".join(s["TransferSyntaxes"])))  # fmt: skip
    others = [r for r in records if not r["dicom"]]
    print(line(files=len(records), dicom=len(records) - len(others), not_dicom=len(others),
               series=len(series)))  # fmt: skip
    if len(args) == 2:
        summary = {"input": args[0], "files": len(records), "series": series, "not_dicom": others}
        out = Path(args[1]) / "summary.json"
        try:
            out.write_text(json.dumps(summary, indent=2) + "\n")
        except OSError as exc:  # most often a job that keeps no outputs: /outputs is absent
            sys.exit(f"dicom-reader: cannot write {out}: {exc.strerror}")
        print(line(summary=out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
