"""Per-image results of a robustness evaluation, saved as they are computed.

A SEA run costs about 900 forward/backward passes per image, so an interrupted
run must not lose finished images. Every rank appends one JSON line per finished
image to its own file in a folder named after a fingerprint of the evaluation
(model config, checkpoint, attacks, eps, seed); a restarted run with the same
fingerprint reads every file of the folder (whatever the number of ranks was) and
skips the images it finds. A line cut short by a kill is ignored.

The cache is its own component: :meth:`ResultCache.for_evaluation` opens the
folder of an evaluation under ``work_dir/robustness_cache/``; the test loop only
asks it for finished images (:meth:`get`) and hands it new ones (:meth:`put`).
"""

import hashlib
import json
import os
import os.path as osp
from typing import Dict, Iterable, Optional

__all__ = ['ResultCache', 'fingerprint']


def fingerprint(obj) -> str:
    """A short stable hash of a JSON-serialisable description."""
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


class ResultCache:
    """Append-only store of per-image records, keyed by image.

    Args:
        folder (str): where the evaluation's files live (created).
        rank (int): this process's rank (its file is ``rank{rank}.jsonl``).
        description (dict, optional): what the fingerprint was made of, written to
            ``meta.json`` for humans.
    """

    @classmethod
    def for_evaluation(
        cls, work_dir: str, description: dict, rank: int = 0
    ) -> 'ResultCache':
        """The cache of the evaluation described by ``description`` (a
        JSON-serialisable dict of everything the results depend on), in
        ``work_dir/robustness_cache/<fingerprint>/``."""
        folder = osp.join(work_dir, 'robustness_cache', fingerprint(description))
        return cls(folder, rank, description)

    def __init__(
        self, folder: str, rank: int = 0, description: Optional[dict] = None
    ) -> None:
        self.folder = folder
        os.makedirs(folder, exist_ok=True)
        if description is not None and rank == 0:
            with open(osp.join(folder, 'meta.json'), 'w') as f:
                json.dump(description, f, indent=1, default=str)
        self.records: Dict[str, dict] = {}
        for name in sorted(os.listdir(folder)):
            if name.endswith('.jsonl'):
                self._read(osp.join(folder, name))
        self.path = osp.join(folder, f'rank{rank}.jsonl')
        if osp.isfile(self.path) and osp.getsize(self.path) > 0:
            with open(self.path, 'rb+') as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b'\n':  # end a line cut short by a kill
                    f.write(b'\n')

    def _read(self, path: str) -> None:
        with open(path) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # the last line of a killed run
                    continue
                self.records[record['key']] = record

    def __len__(self) -> int:
        return len(self.records)

    def get(self, key: str) -> Optional[dict]:
        return self.records.get(key)

    def put(self, records: Iterable[dict]) -> None:
        """Save records (on disk before returning)."""
        with open(self.path, 'a') as f:
            for record in records:
                self.records[record['key']] = record
                f.write(json.dumps(record, separators=(',', ':')) + '\n')
            f.flush()
            os.fsync(f.fileno())
