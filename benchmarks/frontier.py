"""The attack frontier: worst-case mIoU and aACC against the passes spent per
image, for SEA, its members alone, their pairs and new ensembles, on the demo's
models and the small SegFormer and DeepLabV3+ of
benchmarks/train_frontier_models.py.

    python benchmarks/frontier.py [--demo-dir work_dirs/demo] [--train-root work_dirs]
        [--models-json work_dirs/frontier/models.json] [--model NAME=CONFIG:CKPT ...]
        [--models NAME ...] [--methods NAME ...] [--eps 4 8] [--seeds 0 1 2]
        [--images 48] [--budgets 1] [--steps-scale 1] [--state-dir DIR] [--out J]

For every model, method, budget, eps and seed the method's attacks run on the
first ``--images`` validation images with the Runner-free
:class:`~mmseg_robust.evaluation.RobustnessEvaluator` (README, "From Python"),
and the method's result is its worst case over its attacks
(:func:`~mmseg_robust.evaluation.summarize_records`, docs/algorithms.md section
4: the 'best' greedy mIoU and SEA's per-image aACC) and its passes per image
(docs/algorithms.md section 3.6: the mean over images of the forward+backward
passes, summed over its attacks; forward-only passes apart).

A method (:data:`METHODS`) is a list of attack configs. An ensemble's attacks run
independently from the clean images, as SEA's members do, so each distinct
attack config (a *unit*) runs once per model, eps and seed, and every method
holding it reads its records: SEA and its pairs cost what their members cost
alone. Each unit starts from its own random points (its evaluator seed is
derived from the run seed and the unit's name), as SEA's members do
(:func:`~mmseg_robust.attacks.sea.derive_seeds`).

``--budgets`` runs every method at several multiples of its iterations (a line
per method in the plot); ``--steps-scale`` shrinks every budget (smoke runs).

Resumable: each unit's records (``STATE_DIR/units.jsonl``) and each method's
result (``STATE_DIR/results.jsonl``) are appended as they finish, and a rerun
with the same settings skips them. At the end: the JSON (``--out``, default
``benchmarks/results/frontier_<device>_<date>.json``: settings, machine, date,
command, versions, every result, the aggregates over seeds and the preset bars),
the plot (``.png`` next to it: x passes per image, y worst-case mIoU, one panel
per model and eps) and the markdown table (``.md`` next to it, also printed).

Preset bars (:func:`preset_bars`), against SEA at the largest budget, per
candidate method and budget (:data:`PRESET_CANDIDATES`), with the mean over
seeds and the seed spread (the standard deviation over seeds, 0 with one seed):

* ``stronger``: passes per image at most SEA's on every model and eps; on every
  robust model (not ``--clean-models``) and eps at least 0.5 points below SEA in
  worst-case mIoU or aACC; on every model (clean included), eps and metric never
  above SEA by more than the larger of the two spreads;
* ``cheaper``: passes at most half of SEA's on every model and eps, and on every
  model, eps and metric at most 0.3 points above SEA.
"""

import argparse
import collections
import datetime
import glob
import hashlib
import json
import math
import os
import os.path as osp
import platform
import statistics
import sys
import time
import warnings
from typing import Optional

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, REPO)
warnings.filterwarnings('ignore', message='pkg_resources is deprecated')

#: iterations of every attack at budget 1 (the SEA paper's)
STEPS = 300
#: the losses of SEA, in its order (docs/algorithms.md section 4)
SEA_MEMBERS = ('Mask-CE-Bal', 'Mask-CE', 'JS-Avg')


def apgd(loss: str, steps: int = STEPS, miou_candidate: bool = False) -> dict:
    """APGD with the progressive radius, as SEA runs each member
    (:class:`~mmseg_robust.attacks.APGDLargeEps`), named by its loss; with
    ``miou_candidate``, also its mIoU candidate (docs/algorithms.md 4.2)."""
    cfg = dict(type='APGDLargeEps', loss=loss, steps=steps, name=loss)
    return dict(cfg, miou_candidate=True) if miou_candidate else cfg


def sea(
    steps: int,
    refine_steps: int = 0,
    name: str = 'SEA',
    losses=SEA_MEMBERS,
    miou_candidates: bool = False,
) -> dict:
    """SEA with ``losses`` (default: its three members), ``steps`` iterations
    each and a refinement of ``refine_steps`` (docs/algorithms.md section 4.1)
    as one unit: the refinement depends on the members' outcomes; with
    ``miou_candidates``, the members' mIoU candidates (section 4.2)."""
    cfg = dict(
        type='SEA',
        losses=list(losses),
        steps=steps,
        refine_steps=refine_steps,
        name=name,
    )
    return dict(cfg, miou_candidates=True) if miou_candidates else cfg


#: appended to a unit's name: the unit rerun with its mIoU candidates
#: (docs/algorithms.md 4.2); it runs from the unit's own random starts
#: (:func:`unit_seed`), so its outputs are the unit's and only the candidates
#: are new: a paired comparison
WITH_CANDIDATES = '+mIoU-iterates'


#: units whose Mask-CE-Bal weighs the classes by the evaluated model's own
#: clean unions on the evaluated images, ``w_c ~ 1 / U_c`` (normalised; 0
#: for a class of union 0; :func:`clean_union_weights`), not by the training
#: set's pixel frequency: flipping a correct pixel of class ``c`` lowers the
#: mIoU by about ``1 / (C U_c)`` (a metric-aware objective, docs/benchmarks.md);
#: each starts from the random points of the unit named
CLEAN_UNION_UNITS = {'Mask-CE-Bal-U': 'Mask-CE-Bal'}

#: attack configs by name: the units the methods are made of
ATTACKS = collections.OrderedDict(
    [(loss, apgd(loss)) for loss in SEA_MEMBERS + ('CE', 'Tsallis-CE')]
    + [('PAdam', dict(type='PAdam', loss='CE', steps=STEPS, name='PAdam'))]
    # SEA's budget (3 x 300 passes) split between the members and a refinement
    + [
        ('SEA-R250', sea(250, 150, 'SEA-R250')),
        ('SEA-R200', sea(200, 300, 'SEA-R200')),
        # Mask-CE, rarely the worst member, replaced by a refinement
        ('SEA2-R300', sea(300, 300, 'SEA2-R300', ('Mask-CE-Bal', 'JS-Avg'))),
        # half of SEA's budget
        ('SEA-150', sea(150, 0, 'SEA-150')),
        ('SEA-R120', sea(120, 90, 'SEA-R120')),
        ('SEA2-R150', sea(150, 150, 'SEA2-R150', ('Mask-CE-Bal', 'JS-Avg'))),
    ]
    + [('Mask-CE-Bal-U', dict(apgd('Mask-CE-Bal'), name='Mask-CE-Bal-U'))]
    # SEA's members and the two SEA2 ensembles with their mIoU candidates
    + [
        (loss + WITH_CANDIDATES, apgd(loss, miou_candidate=True))
        for loss in SEA_MEMBERS
    ]
    + [
        (
            f'SEA2-R{n}{WITH_CANDIDATES}',
            sea(n, n, f'SEA2-R{n}', ('Mask-CE-Bal', 'JS-Avg'), miou_candidates=True),
        )
        for n in (300, 150)
    ]
)
#: method name -> its attacks (names of :data:`ATTACKS`); its worst case is over
#: them and its passes their sum
METHODS = collections.OrderedDict(
    [
        (name, [name])
        for name in ATTACKS
        if not name.startswith('SEA')
        and not name.endswith(WITH_CANDIDATES)
        and name not in CLEAN_UNION_UNITS
    ]
    + [
        ('Mask-CE-Bal+Mask-CE', ['Mask-CE-Bal', 'Mask-CE']),
        ('Mask-CE-Bal+JS-Avg', ['Mask-CE-Bal', 'JS-Avg']),
        ('Mask-CE+JS-Avg', ['Mask-CE', 'JS-Avg']),
        ('SEA', list(SEA_MEMBERS)),
        # SEA with Mask-CE replaced by the Tsallis-CE (docs/algorithms.md 2)
        ('SEA-Tsallis', ['Mask-CE-Bal', 'Tsallis-CE', 'JS-Avg']),
    ]
    + [(name, [name]) for name in ATTACKS if name.startswith('SEA')]
    + [('SEA' + WITH_CANDIDATES, [m + WITH_CANDIDATES for m in SEA_MEMBERS])]
    # SEA with Mask-CE-Bal weighted by the clean unions (paired with SEA: its
    # other two members are SEA's own runs)
    + [('SEA-U', ['Mask-CE-Bal-U', 'Mask-CE', 'JS-Avg'])]
)
#: the models evaluated by default, when found: the demo's four and the PIR-AT
#: models of benchmarks/train_frontier_models.py (its clean models, their
#: starting points, with ``--models``)
DEFAULT_MODELS = (
    'clean',
    'PIR-AT',
    'SAT',
    'DDC-AT',
    'SegFormer-PIR-AT',
    'DeepLabV3+-PIR-AT',
)
#: the methods whose preset bars are reported (every method but SEA)
PRESET_CANDIDATES = tuple(m for m in METHODS if m != 'SEA')
REFERENCE = 'SEA'

#: the demo's models (tools/demo.py): name -> config
DEMO_MODELS = collections.OrderedDict(
    [
        ('clean', 'configs/synthetic/upernet_convnext-micro_synthetic.py'),
        ('PIR-AT', 'configs/synthetic/upernet_convnext-micro_pirat_synthetic.py'),
        ('SAT', 'configs/synthetic/upernet_convnext-micro_sat_synthetic.py'),
        ('DDC-AT', 'configs/synthetic/upernet_convnext-micro_ddcat_synthetic.py'),
    ]
)


# ------------------------------------------------------------------ models
def discover_models(demo_dir, train_root, models_json, explicit) -> dict:
    """``{name: {'config', 'checkpoint'}}``: the demo's four models (where
    ``tools/demo.py`` writes them: ``TRAIN_ROOT/<config name>/iter_<N>.pth``
    with the configs' iterations, else the newest ``DEMO_DIR/train/<model>-
    <N>it``), the models of ``models_json`` (benchmarks/train_frontier_models.py)
    and the ``NAME=CONFIG:CHECKPOINT`` entries of ``explicit`` (which win)."""
    from mmengine.config import Config

    found = collections.OrderedDict()
    for name, config in DEMO_MODELS.items():
        stem = osp.splitext(osp.basename(config))[0]
        iters = int(Config.fromfile(osp.join(REPO, config)).train_cfg.max_iters)
        candidates = [osp.join(train_root, stem, f'iter_{iters}.pth')]
        if demo_dir:
            runs = glob.glob(osp.join(demo_dir, 'train', f'{name}-*it'))
            for run in sorted(runs, key=lambda r: -_iters_of(r)):
                candidates.append(osp.join(run, f'iter_{_iters_of(run)}.pth'))
        for ckpt in candidates:
            if osp.isfile(ckpt):
                found[name] = dict(config=config, checkpoint=ckpt)
                break
    if models_json and osp.isfile(models_json):
        with open(models_json) as f:
            for name, entry in json.load(f).items():
                if osp.isfile(entry['checkpoint']):
                    found[name] = dict(
                        config=entry['config'], checkpoint=entry['checkpoint']
                    )
    for spec in explicit or []:
        name, sep, rest = spec.partition('=')
        config, sep2, ckpt = rest.rpartition(':')
        if not (sep and sep2 and name and config and ckpt):
            raise SystemExit(
                f'--model {spec!r}: write NAME=CONFIG:CHECKPOINT, e.g. '
                'PIR-AT=configs/synthetic/upernet_convnext-micro_pirat_synthetic.py'
                ':work_dirs/upernet_convnext-micro_pirat_synthetic/iter_300.pth'
            )
        found[name] = dict(config=config, checkpoint=ckpt)
    return found


def _iters_of(run_dir: str) -> int:
    tail = osp.basename(run_dir).rsplit('-', 1)[-1]
    return int(tail[:-2]) if tail.endswith('it') and tail[:-2].isdigit() else -1


def load_model(
    config: str, checkpoint: str, data_root=None, images=48, batch=8, cfg_options=None
):
    """The model (eval mode, CPU, the checkpoint loaded with
    ``weights_only=True``), the test dataloader of its first ``images``
    validation images, its config (``cfg_options`` merged) and its ignore
    index."""
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mmengine.runner import Runner

    import mmseg_robust  # noqa: F401 (registers the models and attacks)
    from mmseg_robust.models import ignore_index_of
    from mmseg_robust.models.checkpoint import load_checkpoint_file, unwrap_state_dict
    from mmseg_robust.registry import MODELS

    init_default_scope('mmseg')
    cfg = Config.fromfile(config if osp.isabs(config) else osp.join(REPO, config))
    if cfg_options:
        cfg.merge_from_dict(dict(cfg_options))
    model = MODELS.build(cfg.model)
    state = unwrap_state_dict(load_checkpoint_file(checkpoint), checkpoint)
    model.load_state_dict(state, strict=True)
    model.eval()
    loader_cfg = cfg.test_dataloader.copy()
    loader_cfg['batch_size'] = batch
    loader_cfg['num_workers'] = 0
    loader_cfg['persistent_workers'] = False
    dataset = dict(loader_cfg['dataset'])
    dataset['indices'] = int(images)
    if data_root is not None:
        dataset['data_root'] = data_root
    loader_cfg['dataset'] = dataset
    loader = Runner.build_dataloader(loader_cfg)
    if len(loader.dataset) < images:
        raise SystemExit(
            f'{config}: the test set has {len(loader.dataset)} images, fewer than '
            f'--images {images}'
        )
    return model, loader, cfg, ignore_index_of(model)


def class_weights_for(cfg, cache: dict, data_root=None) -> list:
    """Mask-CE-Bal's class weights of the config's training set (as
    ``evaluator=SEA`` computes them), cached per training set."""
    from mmseg_robust.engine import dataset_class_weights

    train = dict(cfg.train_dataloader.dataset)
    if data_root is not None:
        train['data_root'] = data_root
    num_classes = int(cfg.model.decode_head.num_classes)
    key = json.dumps([train, num_classes], sort_keys=True, default=str)
    if key not in cache:
        cache[key] = dataset_class_weights(train, num_classes)
    return cache[key]


def clean_union_weights(model, loader, ignore: int, num_classes: int) -> list:
    """Mask-CE-Bal weights from the model's clean predictions on the images
    of ``loader``: ``w_c ~ 1 / U_c`` with ``U_c`` the union of class ``c``
    summed over the images (0 where ``U_c = 0``), normalised to sum 1."""
    import torch

    from mmseg_robust.evaluation import ImageCounts
    from mmseg_robust.models import SegmentorPixelView

    union = [0] * num_classes
    with torch.no_grad():
        for batch in loader:
            view = SegmentorPixelView(model, batch)
            _, pred = view.predict()
            for c in ImageCounts.of_batch(pred, view.labels, num_classes, ignore):
                union = [u + v for u, v in zip(union, c.union)]
    inv = [1.0 / u if u > 0 else 0.0 for u in union]
    return [w / sum(inv) for w in inv]


# ------------------------------------------------------------------- units
def needs_class_weights(name: str) -> bool:
    """Whether unit ``name`` runs Mask-CE-Bal (it needs the class weights)."""
    cfg = ATTACKS[name]
    return cfg.get('loss') == 'Mask-CE-Bal' or 'Mask-CE-Bal' in cfg.get('losses', ())


def unit_config(name: str, scale: float, class_weights=None) -> dict:
    """The attack config of unit ``name`` with its iterations (and an
    ensemble's refinement) times ``scale`` (at least 1), Mask-CE-Bal with
    ``class_weights``."""
    cfg = dict(ATTACKS[name])
    cfg['steps'] = max(1, int(round(cfg['steps'] * scale)))
    if cfg.get('refine_steps'):
        cfg['refine_steps'] = max(1, int(round(cfg['refine_steps'] * scale)))
    if cfg.get('loss') == 'Mask-CE-Bal':
        cfg['loss'] = dict(type='Mask-CE-Bal', class_weights=class_weights)
    if 'Mask-CE-Bal' in cfg.get('losses', ()):
        cfg['class_weights'] = class_weights
    return cfg


def base_unit(name: str) -> str:
    """The unit that unit ``name`` varies in one thing (its mIoU candidates,
    :data:`WITH_CANDIDATES`; the clean-union weights,
    :data:`CLEAN_UNION_UNITS`), from the same random starts; else ``name``."""
    name = name.removesuffix(WITH_CANDIDATES)
    return CLEAN_UNION_UNITS.get(name, name)


def unit_seed(seed: int, name: str) -> int:
    """The evaluator seed of unit ``name`` in the run of seed ``seed``: each
    unit its own random starts, as SEA's members (``derive_seeds``); a unit
    that varies another (:func:`base_unit`) the other's."""
    name = base_unit(name)
    digest = hashlib.blake2b(f'{int(seed)}/{name}'.encode(), digest_size=4).digest()
    return int.from_bytes(digest, 'little') >> 1


def run_unit(model, loader, ignore, cfg: dict, eps: float, seed: int):
    """Records (:meth:`ImageRecord.to_json`) of one attack config at ``eps`` on
    every batch of ``loader``, and the seconds it took."""
    from mmseg_robust.evaluation import RobustnessEvaluator
    from mmseg_robust.models import SegmentorPixelView

    evaluator = RobustnessEvaluator([cfg], eps=[eps], seed=seed, ignore_index=ignore)
    records = []
    t0 = time.perf_counter()
    for batch in loader:
        keys = [s.img_path for s in batch['data_samples']]
        result = evaluator.evaluate(SegmentorPixelView(model, batch), keys)
        records += [r.to_json() for r in result.records]
    return records, time.perf_counter() - t0


# ----------------------------------------------------------------- methods
def method_result(method: str, units: dict, eps: float) -> dict:
    """One method's numbers from its units' records: worst-case mIoU and aACC
    (%), clean mIoU/aACC, passes and forwards per image (means over images,
    summed over its attacks), wall seconds (summed)."""
    from mmseg_robust.evaluation import summarize_records
    from mmseg_robust.evaluation.counts import eps_key

    names = METHODS[method]
    first = units[names[0]]['records']
    records = []
    for i, rec in enumerate(first):
        attacks = collections.OrderedDict()
        for name in names:
            other = units[name]['records'][i]
            if other['key'] != rec['key']:
                raise RuntimeError(f'{method}: the units saw different images')
            attacks.update(other['attacks'][eps_key(eps)])
        records.append(dict(rec, attacks={eps_key(eps): attacks}))
    summary = summarize_records(records, worst_case_modes=('best',))
    at = summary['eps'][eps_key(eps)]
    budget = at['budget']
    # the attacks of the records: the units' own names, an ensemble unit's
    # members (SEA-R250:APGD-Mask-CE-Bal, ..., SEA-R250:Refine)
    recorded = list(records[0]['attacks'][eps_key(eps)]) if records else []
    missing = [n for n in recorded if n not in budget]
    if missing:
        raise RuntimeError(f'{method}: no pass counts in the records of {missing}')
    return dict(
        mIoU=at['worst_case']['mIoU'],
        aACC=at['worst_case']['aAcc_img'],
        clean_mIoU=summary['clean']['mIoU'],
        clean_aACC=summary['clean']['aAcc_img'],
        passes=sum(budget[n]['passes'] for n in recorded),
        forwards=sum(budget[n]['forwards'] for n in recorded),
        passes_max=sum(budget[n]['passes_max'] for n in recorded),
        steps={n: units[n]['steps'] for n in names},
        attacks={n: at['attacks'][n]['mIoU'] for n in recorded},
        wall_s=sum(units[n]['wall_s'] for n in names),
        images=summary['num_images'],
    )


def _read_jsonl(path: str) -> list:
    out = []
    if osp.isfile(path):
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line:
                    try:
                        out.append(json.loads(line))
                    except json.JSONDecodeError:  # a line cut by an interruption
                        continue
    return out


def _append_jsonl(path: str, entry: dict) -> None:
    with open(path, 'a') as f:
        f.write(json.dumps(entry) + '\n')
        f.flush()
        os.fsync(f.fileno())


def run_benchmark(
    models: dict,
    methods,
    eps,
    seeds,
    images: int,
    state_dir: str,
    budgets=(1.0,),
    steps_scale: float = 1.0,
    data_root=None,
    batch: int = 8,
    cfg_options=None,
    log=print,
) -> list:
    """Every (model, method, budget, eps, seed) result, running what
    ``state_dir`` does not hold yet (see the module docstring).

    Args:
        models (dict): ``{name: {'config', 'checkpoint'}}``.
        methods (sequence of str): names of :data:`METHODS`.
        eps, seeds (sequence): radii (/255) and run seeds.
        images (int): the first validation images evaluated.
        state_dir (str): where ``units.jsonl`` and ``results.jsonl`` are kept.
        budgets (sequence of float): multiples of the methods' iterations.
        steps_scale (float): shrinks every budget (smoke runs).
        data_root (str, optional): the dataset's root (default: the config's).
        batch (int): images per batch.
        cfg_options (dict, optional): merged into every model's config (as
            ``tools/test.py --cfg-options``).
        log (callable): progress lines.

    Returns:
        list[dict]: the results, one per (model, method, budget, eps, seed),
        each with its settings and :func:`method_result`'s numbers.
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f'unknown methods {unknown}; known: {list(METHODS)}')
    os.makedirs(state_dir, exist_ok=True)
    units_path = osp.join(state_dir, 'units.jsonl')
    results_path = osp.join(state_dir, 'results.jsonl')
    setting = dict(images=int(images), steps_scale=float(steps_scale))

    def unit_id(model, name, budget, e, seed):
        ckpt = osp.abspath(models[model]['checkpoint'])
        return json.dumps([model, ckpt, name, budget, e, seed, setting])

    def result_id(model, method, budget, e, seed):
        ckpt = osp.abspath(models[model]['checkpoint'])
        return json.dumps([model, ckpt, method, budget, e, seed, setting])

    units = {u['id']: u for u in _read_jsonl(units_path)}
    results = collections.OrderedDict((r['id'], r) for r in _read_jsonl(results_path))
    budgets = [float(b) for b in budgets]
    eps = [float(e) for e in eps]
    seeds = [int(s) for s in seeds]
    out = []
    weights_cache: dict = {}
    for model_name, spec in models.items():
        todo = [
            (m, b, e, s)
            for m in methods
            for b in budgets
            for e in eps
            for s in seeds
            if result_id(model_name, m, b, e, s) not in results
        ]
        if todo:
            model, loader, cfg, ignore = load_model(
                spec['config'],
                spec['checkpoint'],
                data_root,
                images,
                batch,
                cfg_options,
            )
            weights = union_weights = None
            needed = {n for m, *_ in todo for n in METHODS[m]}
            if any(needs_class_weights(n) for n in needed):
                weights = class_weights_for(cfg, weights_cache, data_root)
            if needed & set(CLEAN_UNION_UNITS):
                k = int(cfg.model.decode_head.num_classes)
                union_weights = clean_union_weights(model, loader, ignore, k)
                log(f'{model_name}: clean-union class weights {union_weights}')
        for method in methods:
            for budget in budgets:
                for e in eps:
                    for seed in seeds:
                        rid = result_id(model_name, method, budget, e, seed)
                        if rid in results:
                            out.append(results[rid])
                            continue
                        got = {}
                        for name in METHODS[method]:
                            uid = unit_id(model_name, name, budget, e, seed)
                            if uid not in units:
                                acfg = unit_config(
                                    name,
                                    budget * steps_scale,
                                    union_weights
                                    if name in CLEAN_UNION_UNITS
                                    else weights,
                                )
                                log(
                                    f'{model_name} eps {e:g} seed {seed}: {name} '
                                    f'({acfg["steps"]} steps) ...'
                                )
                                records, wall = run_unit(
                                    model,
                                    loader,
                                    ignore,
                                    acfg,
                                    float(e),
                                    unit_seed(seed, name),
                                )
                                units[uid] = dict(
                                    id=uid,
                                    records=records,
                                    wall_s=wall,
                                    steps=acfg['steps'],
                                    config=acfg,
                                )
                                _append_jsonl(units_path, units[uid])
                            got[name] = units[uid]
                        res = dict(
                            id=rid,
                            model=model_name,
                            method=method,
                            budget=float(budget),
                            eps=float(e),
                            seed=int(seed),
                            **method_result(method, got, float(e)),
                        )
                        _append_jsonl(results_path, res)
                        results[rid] = res
                        out.append(res)
                        log(
                            f'{model_name} eps {e:g} seed {seed} {method} x{budget:g}: '
                            f'mIoU {res["mIoU"]:.2f} aACC {res["aACC"]:.2f} '
                            f'passes {res["passes"]:.1f}'
                        )
    return out


# ------------------------------------------------------------- aggregates
def _mean_std(values):
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return float('nan'), float('nan')
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return statistics.fmean(values), std


def aggregate(results: list) -> list:
    """Mean and spread (standard deviation) over seeds per model, method,
    budget and eps."""
    groups = collections.OrderedDict()
    for r in results:
        groups.setdefault((r['model'], r['method'], r['budget'], r['eps']), []).append(
            r
        )
    rows = []
    for (model, method, budget, e), rs in groups.items():
        row = dict(model=model, method=method, budget=budget, eps=e, seeds=len(rs))
        for key in ('mIoU', 'aACC', 'passes', 'forwards', 'wall_s'):
            row[key], row[f'{key}_std'] = _mean_std([r[key] for r in rs])
        row['clean_mIoU'] = rs[0]['clean_mIoU']
        rows.append(row)
    return rows


def paired_base(method: str) -> Optional[str]:
    """The method ``method`` differs from in one thing on otherwise the same
    attack runs (same random starts): the method made of the
    :func:`base_unit` of each of its units (a method with its mIoU
    candidates: the method; ``SEA-U``: SEA); None if that is ``method``
    itself or no method."""
    units = [base_unit(n) for n in METHODS[method]]
    if units == METHODS[method]:
        return None
    return next((m for m, u in METHODS.items() if u == units), None)


def paired_differences(results: list) -> list:
    """A method minus its :func:`paired_base`, seed by seed, then the mean
    and spread over the seeds, per model, budget and eps where both ran."""
    by_key = {
        (r['model'], r['method'], r['budget'], r['eps'], r['seed']): r for r in results
    }
    groups = collections.OrderedDict()
    for (model, method, budget, e, seed), r in by_key.items():
        base = paired_base(method)
        if base is None:
            continue
        b = by_key.get((model, base, budget, e, seed))
        if b is not None:
            groups.setdefault((model, method, base, budget, e), []).append((r, b))
    rows = []
    for (model, method, base, budget, e), pairs in groups.items():
        row = dict(model=model, method=method, base=base, budget=budget, eps=e)
        row['seeds'] = len(pairs)
        for key in ('mIoU', 'aACC', 'passes'):
            row[key], row[f'{key}_std'] = _mean_std([r[key] - b[key] for r, b in pairs])
        rows.append(row)
    return rows


def preset_bars(rows: list, clean_models, candidates=PRESET_CANDIDATES) -> list:
    """The two preset bars (module docstring) of every candidate method and
    budget, against SEA at its largest budget, over the models and eps where
    both were run."""
    ref_budget = max(
        (r['budget'] for r in rows if r['method'] == REFERENCE), default=None
    )
    if ref_budget is None:
        return []
    ref = {
        (r['model'], r['eps']): r
        for r in rows
        if r['method'] == REFERENCE and r['budget'] == ref_budget
    }
    out = []
    keys = collections.OrderedDict(
        ((r['method'], r['budget']), None) for r in rows if r['method'] in candidates
    )
    for method, budget in keys:
        cells = []
        for r in rows:
            if (r['method'], r['budget']) != (method, budget):
                continue
            s = ref.get((r['model'], r['eps']))
            if s is None:
                continue
            spread = {k: max(r[f'{k}_std'], s[f'{k}_std']) for k in ('mIoU', 'aACC')}
            diff = {k: r[k] - s[k] for k in ('mIoU', 'aACC')}
            robust = r['model'] not in clean_models
            cells.append(
                dict(
                    model=r['model'],
                    eps=r['eps'],
                    robust=robust,
                    passes_ratio=r['passes'] / s['passes'] if s['passes'] else None,
                    diff=diff,
                    spread=spread,
                    lower_by_half=min(diff.values()) <= -0.5,
                    not_weaker=all(diff[k] <= spread[k] for k in diff),
                    within_03=all(diff[k] <= 0.3 for k in diff),
                )
            )
        if not cells:
            continue
        ratios = [c['passes_ratio'] for c in cells]
        known = all(x is not None for x in ratios)
        stronger = (
            known
            and all(x <= 1.0 for x in ratios)
            and all(c['lower_by_half'] for c in cells if c['robust'])
            and any(c['robust'] for c in cells)
            and all(c['not_weaker'] for c in cells)
        )
        cheaper = (
            known
            and all(x <= 0.5 for x in ratios)
            and all(c['within_03'] for c in cells)
        )
        out.append(
            dict(
                method=method,
                budget=budget,
                reference=dict(method=REFERENCE, budget=ref_budget),
                stronger=bool(stronger),
                cheaper=bool(cheaper),
                max_passes_ratio=max(ratios) if known else None,
                cells=cells,
            )
        )
    return out


def markdown(rows: list, bars: list, paired=()) -> str:
    lines = [
        '| model | eps | method | budget | passes/img | forwards/img | '
        'worst-case mIoU | worst-case aACC | wall (s) | seeds |',
        '|---|---|---|---|---|---|---|---|---|---|',
    ]
    for r in rows:
        lines.append(
            f'| {r["model"]} | {r["eps"]:g} | {r["method"]} | {r["budget"]:g} | '
            f'{r["passes"]:.1f} | {r["forwards"]:.1f} | '
            f'{r["mIoU"]:.2f} ± {r["mIoU_std"]:.2f} | '
            f'{r["aACC"]:.2f} ± {r["aACC_std"]:.2f} | {r["wall_s"]:.1f} | '
            f'{r["seeds"]} |'
        )
    if bars:
        lines += [
            '',
            f'Preset bars against {bars[0]["reference"]["method"]} (budget '
            f'{bars[0]["reference"]["budget"]:g}): stronger = passes <= SEA, '
            '>= 0.5 points lower in mIoU or aACC on every robust model, never '
            'weaker beyond the seed spread; cheaper = passes <= SEA / 2, within '
            '0.3 points on every model.',
            '',
            '| method | budget | max passes / SEA | stronger | cheaper |',
            '|---|---|---|---|---|',
        ]
        for b in bars:
            ratio = b['max_passes_ratio']
            lines.append(
                f'| {b["method"]} | {b["budget"]:g} | '
                f'{"-" if ratio is None else f"{ratio:.2f}"} | '
                f'{"yes" if b["stronger"] else "no"} | '
                f'{"yes" if b["cheaper"] else "no"} |'
            )
    if paired:
        lines += [
            '',
            'Paired: a method minus the method it differs from in one thing on the '
            'same attack runs (with the mIoU candidates minus without; SEA-U minus '
            'SEA), mean ± standard deviation over the seeds of the per-seed '
            'differences, points.',
            '',
            '| model | eps | method | minus | budget | Δ mIoU | Δ aACC | '
            'Δ passes/img | seeds |',
            '|---|---|---|---|---|---|---|---|---|',
        ]
        for r in paired:
            lines.append(
                f'| {r["model"]} | {r["eps"]:g} | {r["method"]} | {r["base"]} | '
                f'{r["budget"]:g} | '
                f'{r["mIoU"]:+.2f} ± {r["mIoU_std"]:.2f} | '
                f'{r["aACC"]:+.2f} ± {r["aACC_std"]:.2f} | '
                f'{r["passes"]:+.1f} | {r["seeds"]} |'
            )
    return '\n'.join(lines) + '\n'


def plot(rows: list, path: str) -> None:
    """x passes per image, y worst-case mIoU (mean, seed spread as error bars);
    one panel per model and eps, one line per method (its budgets)."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    models = list(collections.OrderedDict.fromkeys(r['model'] for r in rows))
    eps = sorted({r['eps'] for r in rows})
    methods = list(collections.OrderedDict.fromkeys(r['method'] for r in rows))
    ncol = min(4, len(methods))
    legend_in = 0.25 * math.ceil(len(methods) / ncol) + 0.2  # inches on top
    height = 3.2 * len(models) + legend_in
    fig, axes = plt.subplots(
        len(models),
        len(eps),
        figsize=(max(9.0, 4.5 * len(eps)), height),
        squeeze=False,
    )
    cmap = plt.get_cmap('tab20')
    markers = 'osD^v<>phX*P'
    for i, model in enumerate(models):
        for j, e in enumerate(eps):
            ax = axes[i][j]
            for k, method in enumerate(methods):
                pts = sorted(
                    (r['passes'], r['mIoU'], r['mIoU_std'])
                    for r in rows
                    if r['model'] == model and r['eps'] == e and r['method'] == method
                )
                if not pts:
                    continue
                xs, ys, es = zip(*pts)
                ax.errorbar(
                    xs,
                    ys,
                    yerr=es,
                    marker=markers[k % len(markers)],
                    # the reference stands out
                    color='black' if method == REFERENCE else cmap(k % 20),
                    label=method,
                    capsize=2,
                    linewidth=1.5 if method == REFERENCE else 1,
                    markersize=6 if method == REFERENCE else 4,
                )
            ax.set_title(f'{model}, eps {e:g}/255', fontsize=9)
            ax.set_xlabel('passes per image (forward+backward)', fontsize=8)
            ax.set_ylabel('worst-case mIoU (%)', fontsize=8)
            ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc='upper center', ncol=ncol, fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 1 - legend_in / height))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def versions() -> dict:
    import mmcv
    import mmengine
    import mmseg
    import torch

    import mmseg_robust

    return dict(
        python=platform.python_version(),
        torch=torch.__version__,
        mmseg=mmseg.__version__,
        mmengine=mmengine.__version__,
        mmcv=mmcv.__version__,
        mmseg_robust=mmseg_robust.__version__,
    )


def write_outputs(results, settings, out, clean_models, command) -> dict:
    """The JSON, the markdown table and the plot of ``results``."""
    import torch

    rows = aggregate(results)
    bars = preset_bars(rows, clean_models)
    paired = paired_differences(results)
    table = markdown(rows, bars, paired)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    doc = dict(
        script='benchmarks/frontier.py',
        command=command,
        date=datetime.date.today().isoformat(),
        machine=dict(
            processor=platform.processor() or platform.machine(),
            machine=platform.machine(),
            cpus=os.cpu_count(),
            device=device or 'cpu',
            threads=torch.get_num_threads(),
        ),
        versions=versions(),
        settings=settings,
        methods={m: METHODS[m] for m in settings['methods']},
        attacks={n: ATTACKS[n] for m in settings['methods'] for n in METHODS[m]},
        results=[{k: v for k, v in r.items() if k != 'id'} for r in results],
        aggregates=rows,
        presets=bars,
        paired=paired,
    )
    os.makedirs(osp.dirname(osp.abspath(out)), exist_ok=True)
    with open(out, 'w') as f:
        json.dump(doc, f, indent=1)
    stem = osp.splitext(out)[0]
    with open(stem + '.md', 'w') as f:
        f.write(table)
    plot(rows, stem + '.png')
    print(table)
    print(f'JSON: {out}\ntable: {stem}.md\nplot: {stem}.png')
    return doc


def parse_args(argv=None):
    from mmengine.config import DictAction

    p = argparse.ArgumentParser(
        description=__doc__.split('\n\n')[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument('--demo-dir', default=osp.join('work_dirs', 'demo'))
    p.add_argument(
        '--train-root', default='work_dirs', help='where tools/train.py wrote'
    )
    p.add_argument(
        '--models-json',
        default=osp.join('work_dirs', 'frontier', 'models.json'),
        help='benchmarks/train_frontier_models.py output',
    )
    p.add_argument(
        '--model',
        action='append',
        default=[],
        metavar='NAME=CONFIG:CHECKPOINT',
        help='a model besides (or instead of) the discovered ones',
    )
    p.add_argument(
        '--models',
        nargs='+',
        help='the models evaluated (default: those of DEFAULT_MODELS found, and '
        'every --model)',
    )
    p.add_argument(
        '--clean-models',
        nargs='*',
        default=None,
        help="models not robust (preset bars); default: names with 'clean'",
    )
    p.add_argument('--methods', nargs='+', default=list(METHODS), choices=list(METHODS))
    p.add_argument('--eps', type=float, nargs='+', default=[4, 8])
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    p.add_argument('--images', type=int, default=48)
    p.add_argument(
        '--budgets',
        type=float,
        nargs='+',
        default=[1.0],
        help="multiples of the methods' iterations (300 each at 1)",
    )
    p.add_argument(
        '--steps-scale',
        type=float,
        default=1.0,
        help='multiplies every budget (smoke runs, e.g. 0.02)',
    )
    p.add_argument('--batch-size', type=int, default=8)
    p.add_argument('--data-root', default=osp.join('data', 'synthetic_shapes'))
    p.add_argument('--threads', type=int, default=None, help='torch threads')
    p.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        default=None,
        help="merged into every model's config (as tools/test.py's)",
    )
    p.add_argument(
        '--state-dir',
        default=osp.join('work_dirs', 'frontier', 'state'),
        help='the resumable results (JSON lines)',
    )
    p.add_argument('--out', default=None, help='the JSON (.md and .png next to it)')
    args = p.parse_args(argv)
    if args.images < 1:
        p.error('--images must be >= 1')
    if args.steps_scale <= 0 or any(b <= 0 for b in args.budgets):
        p.error('--steps-scale and --budgets must be > 0')
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    models = discover_models(
        args.demo_dir, args.train_root, args.models_json, args.model
    )
    if args.models:
        missing = [m for m in args.models if m not in models]
        if missing:
            raise SystemExit(
                f'--models {missing}: no checkpoint found (found: {list(models)}); '
                'run tools/demo.py and benchmarks/train_frontier_models.py, or pass '
                '--model NAME=CONFIG:CHECKPOINT'
            )
        models = collections.OrderedDict((m, models[m]) for m in args.models)
    else:
        given = {spec.partition('=')[0] for spec in args.model}
        models = collections.OrderedDict(
            (m, s) for m, s in models.items() if m in DEFAULT_MODELS or m in given
        )
    if not models:
        raise SystemExit(
            'no models found: run tools/demo.py (--demo-dir, --train-root) and '
            'benchmarks/train_frontier_models.py (--models-json), or pass '
            '--model NAME=CONFIG:CHECKPOINT'
        )
    for name, spec in models.items():
        print(f'model {name}: {spec["config"]} {spec["checkpoint"]}')
    clean_models = (
        args.clean_models
        if args.clean_models is not None
        else [m for m in models if 'clean' in m.lower()]
    )
    data_root = osp.abspath(args.data_root) if args.data_root else None
    results = run_benchmark(
        models,
        args.methods,
        args.eps,
        args.seeds,
        args.images,
        args.state_dir,
        budgets=args.budgets,
        steps_scale=args.steps_scale,
        data_root=data_root,
        batch=args.batch_size,
        cfg_options=args.cfg_options,
    )
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    date = datetime.date.today().isoformat()
    out = args.out or osp.join(
        REPO, 'benchmarks', 'results', f'frontier_synthetic_{device}_{date}.json'
    )
    settings = dict(
        models=models,
        clean_models=clean_models,
        methods=args.methods,
        eps=args.eps,
        seeds=args.seeds,
        images=args.images,
        budgets=args.budgets,
        steps_scale=args.steps_scale,
        steps_at_budget_1=STEPS,
        batch_size=args.batch_size,
        cfg_options=args.cfg_options,
        worst_case='summarize_records: best greedy mIoU, per-image aACC (%)',
        spread='standard deviation over seeds',
    )
    command = 'python benchmarks/frontier.py ' + ' '.join(argv)
    return write_outputs(results, settings, out, clean_models, command)


if __name__ == '__main__':
    main()
