"""Sources stage (`python -m pipeline.sources`, run on every `dvc repro`): list the data source's files with their
content hashes in `data/source_index.csv`. Split depends on that list, so adding, removing or changing an image
reruns split and whatever its new table changes; a copy of the same images elsewhere (another machine, another data
folder, another virtualenv) gives the same bytes, and DVC's run-cache and remote recognise it.

Hashing is cheap after the first run: `inventory.listing` keeps a per-machine memo of (size, mtime) -> sha256 out of
every output (under `.dvc/tmp`), so only new or changed files are read.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from pipeline import inventory, io, manifest, params, paths
from pipeline.manifest import SourceError


def main(argv=None) -> int:
    data = params.load().data
    try:
        rows = inventory.listing(inventory.source_path(data.model_dump()), content=True, memo=paths.HASH_MEMO,
                                 root=manifest.root_of(data))
    except FileNotFoundError as e:
        raise SourceError(str(e)) from None
    if data.exclude:  # the reviewed list of files to leave out: editing it reruns split too
        listed = Path(data.exclude).expanduser()
        rows.append({"path": "data.exclude", "state": io.sha256_file(listed) if listed.is_file() else "missing"})
    io.write_csv(paths.SOURCE_INDEX, pd.DataFrame(rows, columns=["path", "state"]))
    outside = sum(r["state"] == inventory.OUTSIDE_ROOT for r in rows)
    print(f"sources: {len(rows)} files listed in {paths.SOURCE_INDEX}"
          + (f" ({outside} outside the data root, not read: see data.root)" if outside else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
