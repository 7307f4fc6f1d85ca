"""Per-image results of a robustness evaluation, saved as they are computed.

A SEA run costs about 900 forward/backward passes per image, so an interrupted
run must not lose finished images. Every rank appends one JSON line per finished
image to its own file in a folder named after a fingerprint of everything the
results depend on (:func:`describe_evaluation`, called by the test loop); a
restarted run with the same fingerprint reads every file of the folder (whatever
the number of ranks was) and skips the images it finds. A line cut short by a
kill is ignored.

What the fingerprint covers:

- the code that computes the numbers: a BLAKE2b digest of every ``.py`` file of
  the installed ``mmseg_robust`` package (:func:`source_digest`, computed once
  per process), so any edit of an attack, the counts or the loop invalidates the
  cache (the package version alone did not change with the code);
- the model config, and the checkpoint's path, size and content hash; without
  ``load_from``, the path, size and content hash of every local checkpoint the
  model config names (``init_cfg=dict(type='Pretrained', checkpoint=...)``,
  ``pretrained=...``);
- the test dataset config with its pipeline (without ``indices``: images are
  cached one by one), the attack configs, and each built attack's ``repr`` (its
  settings with the resolved modes: ``zero_acc``, ``first_window``, steps ...) at
  every eps, and the seed;
- the test batch size and the world size, only when an attack's result per
  image depends on its batch (``zero_acc='reference'`` with ``early_stop``, set
  by ``compat='reference'``: the run stops once every image of the batch is at
  accuracy 0); otherwise an image gets the same attack in any batch and records
  are shared between batch sizes and process counts;
- the torch version and the device type (``cpu``, ``cuda``);
- the speed options of the attack's passes (``evaluator.speedups``:
  ``channels_last``, ``compile``, ``bf16``), when any is on;
- how the data files are compared (``data_digest``, below).

The data files actually read are checked per image, not in the fingerprint (so
that a run on the first N images and a run on all share records): each record
and unit carries a stamp of its image's and annotation's files (``img_path``,
``seg_map_path``): their sizes and modification times in ns
(``data_digest='stat'``, the default: a file rewritten in place, even with the
same size, gets a new mtime) or BLAKE2b hashes of their bytes
(``data_digest='content'``: also catches a file replaced with its old mtime
kept, e.g. by ``cp -p`` or ``rsync -t``). An image whose stamp differs is
computed again.

Not covered: installed libraries other than torch (mmseg, mmengine, mmcv,
numpy), files the pipeline reads besides the image and its annotation, the
hardware beyond the device type, and code outside the package (a custom model
class in the user's own module): clear the cache folder (or pass
``evaluator.resume=False``) after changing those.

Every line is validated on reading: its schema, the consistency of its counts
(``sum(intersect) == correct <= valid == sum(label_area)``, ``intersect <=
label_area <= union`` per class) and a per-line checksum (``sum``, BLAKE2b of
the line's other fields). An invalid line (``null``, ``{}``, a hand-edited
record) is ignored with a warning naming the file, the line and the image; the
image is then computed again.

Besides finished images the cache keeps *units*: the counts of one attack at one
eps for the images of a batch, saved as soon as that attack finishes (an image is
finished when all its units are). An interrupted SEA evaluation therefore loses
at most the attack in progress on the batch in progress, not the batch's other
attacks and radii.

A corruption evaluation (:class:`~mmseg_robust.engine.CorruptionTestLoop`)
keeps only units, one per image and corruption x severity pass (``unit:
{corruption, severity}``; the clean pass is ``('clean', 0)``), its counts stored
sparsely (the classes with a non-zero union), so that a resumed ADE20K-C run
(2,000 images x 76 passes x 150 classes) fits in memory.

The cache is its own component: :meth:`ResultCache.for_evaluation` opens the
folder of an evaluation under ``work_dir/robustness_cache/``; the test loop only
asks it for finished images (:meth:`get`) and hands it new ones (:meth:`put`).
"""

import functools
import hashlib
import json
import os
import os.path as osp
import warnings
from typing import Dict, Iterable, List, Optional, Sequence

from mmseg_robust.utils.digests import file_digest

__all__ = [
    'DATA_DIGESTS',
    'ResultCache',
    'batch_dependent',
    'checkpoint_key',
    'data_files',
    'data_stamp',
    'describe_evaluation',
    'describe_model_and_data',
    'file_digest',
    'fingerprint',
    'source_digest',
]

#: How the data files of an image are compared (see the module docstring).
DATA_DIGESTS = ('stat', 'content')
#: Count arrays of a record (one entry per class) and its scalar counts.
_ARRAYS = ('intersect', 'union', 'label_area')
_SCALARS = ('correct', 'valid')


def fingerprint(obj) -> str:
    """A short stable hash of a JSON-serialisable description."""
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=None)
def source_digest(package_dir: Optional[str] = None) -> str:
    """BLAKE2b digest (hex) of the package's code: the relative path and the
    bytes of every ``.py`` file under ``package_dir`` (default: the imported
    ``mmseg_robust``), in sorted order; the configs and tools an installed
    package carries in ``.mim/`` are not code and not counted, so a wheel and
    the source tree it was built from give the same digest. Computed once per
    process (about 100 files, a few ms)."""
    if package_dir is None:
        import mmseg_robust

        package_dir = osp.dirname(osp.abspath(mmseg_robust.__file__))
    digest = hashlib.blake2b(digest_size=16)
    files = []
    for root, dirs, names in os.walk(package_dir):
        dirs[:] = sorted(d for d in dirs if d not in ('__pycache__', '.mim'))
        files += [osp.join(root, n) for n in names if n.endswith('.py')]
    for path in sorted(files):
        rel = osp.relpath(path, package_dir).replace(os.sep, '/')
        digest.update(rel.encode() + b'\0')
        with open(path, 'rb') as f:
            digest.update(f.read())
        digest.update(b'\0')
    return digest.hexdigest()


def data_stamp(paths: Sequence[str], mode: str = 'stat') -> str:
    """Stamp of an image's data files: sizes and mtimes in ns (``'stat'``) or
    BLAKE2b hashes of the bytes (``'content'``); a missing file is stamped as
    such. Equal stamps: the files read are (by that measure) the same."""
    if mode not in DATA_DIGESTS:
        raise ValueError(f'data_digest must be one of {DATA_DIGESTS}, got {mode!r}')
    parts = []
    for path in paths:
        if not osp.isfile(path):
            parts.append([path, 'missing'])
        elif mode == 'content':
            parts.append([path, file_digest(path)])
        else:
            st = os.stat(path)
            parts.append([path, st.st_size, st.st_mtime_ns])
    return fingerprint(parts)


def data_files(sample) -> List[str]:
    """The files the test pipeline reads for a data sample: its image and its
    annotation (``img_path``, ``seg_map_path`` of its metainfo, or of a
    dataset's data info dict)."""
    meta = sample if isinstance(sample, dict) else sample.metainfo
    return [str(meta[k]) for k in ('img_path', 'seg_map_path') if meta.get(k)]


def checkpoint_key(path) -> object:
    """A checkpoint in the cache key: a local file by path, size and content
    hash (a retrained checkpoint at the same path is another model), anything
    else (a URL, None) as given."""
    if isinstance(path, str) and osp.isfile(path):
        return dict(
            path=osp.abspath(path), size=osp.getsize(path), blake2b=file_digest(path)
        )
    return path


def init_checkpoints(model_cfg) -> list:
    """:func:`checkpoint_key` of every checkpoint a model config initialises
    from: ``checkpoint`` (``init_cfg=dict(type='Pretrained', ...)``) and
    ``pretrained`` strings anywhere in it."""
    found = []

    def walk(obj):
        if isinstance(obj, dict):
            for k, v in obj.items():
                if k in ('checkpoint', 'pretrained') and isinstance(v, str):
                    found.append(checkpoint_key(v))
                else:
                    walk(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v)

    walk(model_cfg)
    return found


def batch_dependent(attack) -> bool:
    """Whether an attack's result on an image depends on the other images of
    its batch: APGD's ``zero_acc='reference'`` (``compat='reference'``) with
    ``early_stop`` ends a run once every image of the batch is at accuracy 0
    (docs/algorithms.md section 3.2); every other setting attacks each image
    alone."""
    return getattr(attack, 'zero_acc', None) == 'reference' and bool(
        getattr(attack, 'early_stop', True)
    )


def describe_model_and_data(
    cfg,
    load_from: Optional[str],
    model,
    data_digest: str = 'stat',
    speedups: Sequence[str] = (),
) -> dict:
    """The part of the cache key every evaluation shares: the package's code,
    torch and the device type, the model config and its checkpoints, the test
    dataset config (without ``indices``), how its files are compared and the
    speed options of the passes (``evaluator.speedups``: each can change the
    numbers, bf16 by more than round-off)."""
    import torch

    from mmseg_robust import __version__

    dataset = dict((cfg.get('test_dataloader') or {}).get('dataset') or {})
    dataset.pop('indices', None)
    param = next(iter(model.parameters()), None)
    description = dict(
        version=__version__,
        code=source_digest(),
        torch=torch.__version__,
        device=param.device.type if param is not None else 'cpu',
        model=cfg.get('model'),
        checkpoint=checkpoint_key(load_from),
        dataset=dataset,
        data_digest=data_digest,
    )
    if not load_from:
        description['init_checkpoints'] = init_checkpoints(cfg.get('model'))
    if speedups:
        # absent when off: the keys of plain runs stay as they were
        description['speedups'] = list(speedups)
    return description


def describe_evaluation(
    cfg,
    load_from: Optional[str],
    model,
    dataloader,
    attack_cfgs: List[dict],
    attacks: Dict[str, list],
    seed: int,
    data_digest: str = 'stat',
    speedups: Sequence[str] = (),
) -> dict:
    """Everything the results of an evaluation depend on, the cache's key (see
    the module docstring for what it covers and what not).

    Args:
        cfg (Config): the run's config (``model``, ``test_dataloader``).
        load_from (str, optional): the checkpoint loaded into the model.
        model (nn.Module): the model (its device type is in the key).
        dataloader: the test dataloader (its batch size, for batch-dependent
            attacks).
        attack_cfgs (list[dict]): the attack configs as given.
        attacks (dict): ``{eps key: [built attacks]}``.
        seed (int): the run's seed.
        data_digest (str): how the data files are compared per image.
        speedups (sequence of str): the passes' speed options
            (:func:`~mmseg_robust.models.resolve_speedups`).

    Returns:
        dict: JSON-serialisable (through ``default=str``).
    """
    description = describe_model_and_data(cfg, load_from, model, data_digest, speedups)
    description.update(
        attacks=attack_cfgs,
        built_attacks={e: [repr(a) for a in built] for e, built in attacks.items()},
        eps=[float(e) for e in attacks],
        seed=seed,
    )
    if any(batch_dependent(a) for built in attacks.values() for a in built):
        # the batches an image is attacked in: mmengine's sampler splits the
        # dataset over the ranks, then into batches
        from mmengine.dist import get_world_size

        description['batches'] = dict(
            batch_size=getattr(dataloader, 'batch_size', None),
            world_size=get_world_size(),
        )
    return description


def _checksum(line: dict) -> str:
    """BLAKE2b (hex, 16 characters) of a line's fields other than ``sum``."""
    body = {k: v for k, v in line.items() if k != 'sum'}
    text = json.dumps(body, sort_keys=True, separators=(',', ':'))
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def counts_problem(counts, num_classes: Optional[int] = None) -> Optional[str]:
    """What is wrong with one prediction's counts (None: nothing). Checks the
    schema and the relations every count of
    :func:`~mmseg_robust.evaluation.counts_of_batch` satisfies."""
    if not isinstance(counts, dict):
        return f'counts are {type(counts).__name__}, not an object'
    missing = [k for k in _ARRAYS + _SCALARS if k not in counts]
    if missing:
        return f'counts lack {missing}'
    arrays = [counts[k] for k in _ARRAYS]
    if not all(
        isinstance(a, list) and all(_is_int(v) and v >= 0 for v in a) for a in arrays
    ):
        return 'intersect/union/label_area are not lists of integers >= 0'
    lengths = {len(a) for a in arrays}
    if len(lengths) != 1 or (num_classes is not None and lengths != {num_classes}):
        return f'count lists of lengths {sorted(lengths)} for {num_classes} classes'
    correct, valid = counts['correct'], counts['valid']
    if not (_is_int(correct) and _is_int(valid) and 0 <= correct <= valid):
        return f'correct={correct!r}, valid={valid!r} (need 0 <= correct <= valid)'
    inter, union, area = arrays
    if sum(inter) != correct:
        return f'sum(intersect)={sum(inter)} != correct={correct}'
    if sum(area) != valid:
        return f'sum(label_area)={sum(area)} != valid={valid}'
    if any(i > a or a > u for i, a, u in zip(inter, area, union)):
        return 'intersect <= label_area <= union does not hold for every class'
    # the budget and APGD's late gain, where they were counted
    for key in ('passes', 'forwards', 'late_gain'):
        value = counts.get(key)
        if value is not None and not (_is_int(value) and value >= 0):
            return f'{key}={value!r} is not a count (an integer >= 0)'
    return None


def sparse_counts(counts: dict) -> dict:
    """One prediction's counts with only the classes whose union is non-zero
    (``classes``: their indices; ``num_classes``: K)."""
    classes = [c for c, u in enumerate(counts['union']) if u]
    out = dict(num_classes=len(counts['union']), classes=classes)
    for k in _ARRAYS:
        out[k] = [int(counts[k][c]) for c in classes]
    out.update(correct=int(counts['correct']), valid=int(counts['valid']))
    return out


def dense_counts(sparse: dict) -> dict:
    """The counts :func:`sparse_counts` stored (lists of length K)."""
    k = sparse['num_classes']
    out = {}
    for name in _ARRAYS:
        values = [0] * k
        for c, v in zip(sparse['classes'], sparse[name]):
            values[c] = v
        out[name] = values
    out.update(correct=sparse['correct'], valid=sparse['valid'])
    return out


def sparse_problem(sparse) -> Optional[str]:
    """What is wrong with counts stored by :func:`sparse_counts` (None:
    nothing)."""
    if not isinstance(sparse, dict):
        return 'counts are not an object'
    k, classes = sparse.get('num_classes'), sparse.get('classes')
    if not (_is_int(k) and k >= 1 and isinstance(classes, list)):
        return 'sparse counts without num_classes and classes'
    if not all(_is_int(c) and 0 <= c < k for c in classes) or len(set(classes)) != len(
        classes
    ):
        return 'sparse counts with class indices outside [0, num_classes) or repeated'
    if any(
        not isinstance(sparse.get(n), list) or len(sparse[n]) != len(classes)
        for n in _ARRAYS
    ):
        return 'sparse count lists of other lengths than classes'
    return counts_problem(dense_counts(sparse), k)


def line_problem(line) -> Optional[str]:
    """What is wrong with a parsed cache line (None: a valid record or unit)."""
    if not isinstance(line, dict):
        return f'a JSON {type(line).__name__}, not a record'
    if not isinstance(line.get('key'), str) or not line['key']:
        return 'no image key'
    if line.get('sum') != _checksum(line):
        return 'checksum mismatch (edited, or written by an older version)'
    if (
        'unit' in line
        and isinstance(line['unit'], dict)
        and 'corruption' in line['unit']
    ):
        unit = line['unit']
        if not (isinstance(unit['corruption'], str) and _is_int(unit.get('severity'))):
            return 'corruption unit without corruption (string) and severity (integer)'
        problem = sparse_problem(line.get('counts'))
        return (
            f'{unit["corruption"]} {unit["severity"]}: {problem}' if problem else None
        )
    if 'unit' in line:
        unit, counts = line['unit'], line.get('counts')
        if not (
            isinstance(unit, dict)
            and isinstance(unit.get('eps'), str)
            and _is_int(unit.get('attack'))
        ):
            return 'unit without eps (string) and attack (integer)'
        if not isinstance(counts, dict) or not counts:
            return 'unit without counts'
        for name, c in counts.items():
            problem = counts_problem(c)
            if problem:
                return f'attack {name}: {problem}'
        return None
    num_classes = line.get('num_classes')
    if not _is_int(num_classes) or num_classes < 1:
        return 'no num_classes'
    problem = counts_problem(line.get('clean'), num_classes)
    if problem:
        return f'clean: {problem}'
    attacks = line.get('attacks')
    if not isinstance(attacks, dict) or not attacks:
        return 'no attacks'
    for eps, per_name in attacks.items():
        if not isinstance(per_name, dict) or not per_name:
            return f'eps {eps}: no attack counts'
        for name, c in per_name.items():
            problem = counts_problem(c, num_classes)
            if problem:
                return f'eps {eps}, attack {name}: {problem}'
    return None


def _unit_id(unit: dict) -> tuple:
    """The in-memory key of a unit: ``(eps, attack)`` or ``('corruption',
    name, severity)``."""
    if 'corruption' in unit:
        return ('corruption', unit['corruption'], unit['severity'])
    return (unit['eps'], unit['attack'])


class ResultCache:
    """Append-only store of per-image records, keyed by image.

    Args:
        folder (str): where the evaluation's files live (created).
        rank (int): this process's rank (its file is ``rank{rank}.jsonl``).
        description (dict, optional): what the fingerprint was made of, written to
            ``meta.json`` for humans.

    Attributes:
        invalid (list[str]): the warnings about invalid lines met on reading
            (file, line number, image, what is wrong).
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
        # key -> {data stamp: record} (the newest record per stamp)
        self._records: Dict[str, Dict[Optional[str], dict]] = {}
        # key -> {(eps, attack index): unit}
        self.units: Dict[str, Dict[tuple, dict]] = {}
        self.invalid: List[str] = []
        for name in sorted(os.listdir(folder)):
            if name.endswith('.jsonl'):
                self._read(osp.join(folder, name))
        for key in self._records:  # finished images are not partly done
            self.units.pop(key, None)
        self.path = osp.join(folder, f'rank{rank}.jsonl')
        if osp.isfile(self.path) and osp.getsize(self.path) > 0:
            with open(self.path, 'rb+') as f:
                data = f.read()
                if not data.endswith(b'\n'):
                    # drop a line cut short by a kill (read as such above), so
                    # that it does not end up inside the file, read as invalid
                    f.truncate(data.rfind(b'\n') + 1)

    def _read(self, path: str) -> None:
        with open(path) as f:
            lines = f.readlines()
        for number, text in enumerate(lines, 1):
            if not text.strip():
                continue
            try:
                line = json.loads(text)
            except json.JSONDecodeError:
                if number == len(lines) and not text.endswith('\n'):
                    continue  # the last line of a killed run
                line, problem = None, 'not valid JSON'
            else:
                problem = line_problem(line)
            if problem:
                key = line.get('key') if isinstance(line, dict) else None
                message = (
                    f'{path}, line {number}: invalid robustness cache line '
                    f'({problem}){f" for image {key}" if key else ""}: ignored, '
                    'the image is computed again'
                )
                self.invalid.append(message)
                warnings.warn(message, stacklevel=2)
                continue
            del line['sum']
            key = line['key']
            if 'unit' in line:
                self.units.setdefault(key, {})[_unit_id(line['unit'])] = line
            else:
                self._records.setdefault(key, {})[line.get('data')] = line

    def __len__(self) -> int:
        """The number of images with a record (whatever their data stamp)."""
        return len(self._records)

    @property
    def records(self) -> Dict[str, dict]:
        """``{key: record}``, the newest record of each image."""
        return {k: list(v.values())[-1] for k, v in self._records.items()}

    @property
    def partly_done(self) -> int:
        """The number of images with saved units but no record (an
        interrupted batch)."""
        return sum(1 for k in self.units if k not in self._records)

    def get(self, key: str, data: Optional[str] = None) -> Optional[dict]:
        """The record of image ``key`` computed on data with stamp ``data``
        (:func:`data_stamp`; None: any), or None."""
        found = self._records.get(key)
        if not found:
            return None
        if data is None:
            return list(found.values())[-1]
        return found.get(data)

    def get_unit(
        self, key: str, eps: str, attack: int, data: Optional[str] = None
    ) -> Optional[dict]:
        """A saved unit of an unfinished image: ``{'key', 'unit': {'eps',
        'attack'}, 'counts': {attack name: counts}, 'data'}``, or None (also
        when its data stamp is not ``data``)."""
        unit = self.units.get(key, {}).get((eps, attack))
        if unit is None or (data is not None and unit.get('data') != data):
            return None
        return unit

    def get_corruption_unit(
        self, key: str, corruption: str, severity: int, data: Optional[str] = None
    ) -> Optional[dict]:
        """The counts (dense) of image ``key`` under one corruption pass
        (``('clean', 0)``: the clean pass) computed on data with stamp
        ``data``, or None."""
        unit = self.units.get(key, {}).get(('corruption', corruption, int(severity)))
        if unit is None or (data is not None and unit.get('data') != data):
            return None
        return dense_counts(unit['counts'])

    def put_corruption_units(
        self,
        corruption: str,
        severity: int,
        counts: Dict[str, dict],
        data: Optional[Dict[str, str]] = None,
    ) -> None:
        """Save one corruption pass's counts of some images: ``counts[key]``
        (dense, :func:`~mmseg_robust.evaluation.counts_of_batch`),
        ``data[key]`` the image's data stamp (on disk before returning)."""
        lines = []
        for key, c in counts.items():
            unit = dict(corruption=corruption, severity=int(severity))
            line = dict(key=key, unit=unit, counts=sparse_counts(c))
            if data is not None and key in data:
                line['data'] = data[key]
            self.units.setdefault(key, {})[_unit_id(unit)] = line
            lines.append(line)
        self._append(lines)

    def put(self, records: Iterable[dict]) -> None:
        """Save finished images' records (on disk before returning); a
        record's ``data`` field, if any, is its data stamp."""
        records = list(records)
        for record in records:
            self._records.setdefault(record['key'], {})[record.get('data')] = record
            self.units.pop(record['key'], None)
        self._append(records)

    def put_units(
        self,
        eps: str,
        attack: int,
        counts: Dict[str, dict],
        data: Optional[Dict[str, str]] = None,
    ) -> None:
        """Save one attack's counts at one eps: ``counts[key] = {attack name:
        image counts}``, ``data[key]`` the image's data stamp (on disk before
        returning)."""
        lines = []
        for key, per_name in counts.items():
            unit = dict(eps=eps, attack=attack)
            line = dict(key=key, unit=unit, counts=per_name)
            if data is not None and key in data:
                line['data'] = data[key]
            self.units.setdefault(key, {})[_unit_id(unit)] = line
            lines.append(line)
        self._append(lines)

    def _append(self, lines) -> None:
        with open(self.path, 'a') as f:
            for line in lines:
                line = dict(line)
                line['sum'] = _checksum(line)
                f.write(json.dumps(line, separators=(',', ':')) + '\n')
            f.flush()
            os.fsync(f.fileno())
