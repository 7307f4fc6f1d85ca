"""The README's "From Python" example (the code block that uses
RobustnessEvaluator), run as written on the synthetic config, prints the same
per-image numbers as ``tools/test.py --cfg-options evaluator=SEA``."""

import ast
import glob
import json
import os.path as osp
import re

import torch

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
CONFIG = 'configs/synthetic/upernet_convnext-micro_synthetic.py'
CHECKPOINT = 'work_dirs/upernet_convnext-micro_synthetic/iter_1000.pth'
SEA = dict(type='SEA', steps=2, eps=[4, 8])


def readme_example() -> str:
    """The code block of the README's "### From Python" section that uses
    RobustnessEvaluator, verbatim."""
    text = open(osp.join(REPO, 'README.md')).read()
    section = re.split(r'\n##+ ', text.split('\n### From Python\n', 1)[1])[0]
    blocks = re.findall(r'```python\n(.*?)```', section, flags=re.S)
    (block,) = [b for b in blocks if 'RobustnessEvaluator(' in b]
    return block


def _parse(option: str) -> tuple:
    """``'a.b=1'`` -> ``('a.b', 1)`` (a literal, else the string)."""
    key, value = option.split('=', 1)
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def _accuracy(counts) -> float:
    return counts['correct'] / counts['valid']


def test_readme_python_example_prints_the_numbers_of_tools_test(
    run_tool, synthetic_root, data_options, tmp_path
):
    from mmengine.config import Config, ConfigDict
    from mmengine.registry import init_default_scope

    from mmseg_robust.registry import MODELS

    code = readme_example()
    assert CONFIG in code and CHECKPOINT in code
    # the README's paths, relative to a folder of their own: the synthetic
    # config on the test data (two images), a checkpoint of its model
    options = data_options(synthetic_root) + ['test_dataloader.dataset.indices=2']
    cfg = Config.fromfile(osp.join(REPO, CONFIG))
    cfg.merge_from_dict(dict(_parse(o) for o in options))
    base = tmp_path / 'base.py'
    cfg.dump(str(base))
    own = tmp_path / CONFIG
    own.parent.mkdir(parents=True)
    # the example runs the config's evaluator= (few SEA steps here)
    own.write_text(f'_base_ = [{str(base)!r}]\nevaluator = {SEA!r}\n')
    init_default_scope('mmseg')
    torch.manual_seed(0)
    model = MODELS.build(ConfigDict(cfg.model))
    ckpt = tmp_path / CHECKPOINT
    ckpt.parent.mkdir(parents=True)
    torch.save(dict(state_dict=model.state_dict(), meta={}), str(ckpt))
    (tmp_path / 'example.py').write_text(code)
    printed = run_tool(['python', 'example.py'], cwd=str(tmp_path))
    lines = [line for line in printed.splitlines() if ' clean ' in line]

    # tools/test.py with evaluator=SEA (the same SEA options) on the same data
    work = str(tmp_path / 'work')
    run_tool(
        ['python', 'tools/test.py', str(base), str(ckpt), '--work-dir', work]
        + ['--cfg-options', 'evaluator=SEA', 'evaluator.steps=2', 'evaluator.eps=[4,8]']
    )
    (cache,) = glob.glob(osp.join(work, 'robustness_cache', '*', 'rank0.jsonl'))
    records = [json.loads(line) for line in open(cache)]
    records = [r for r in records if 'unit' not in r]
    assert len(records) == 2 and len(lines) == 2
    for line, rec in zip(lines, records):
        worst = {e: min(map(_accuracy, a.values())) for e, a in rec['attacks'].items()}
        # the README names an attack's record: APGD-Mask-CE
        assert 'APGD-Mask-CE' in rec['attacks']['8'], list(rec['attacks']['8'])
        expected = ' '.join(
            [osp.basename(rec['key']), f'clean {_accuracy(rec["clean"]):.4f}']
            + [f'eps {e}: {acc:.4f}' for e, acc in worst.items()]
        )
        assert line == expected
    (results,) = glob.glob(osp.join(work, 'robustness_*.json'))
    metrics = json.load(open(results))['metrics']
    for eps in ('4', '8'):
        accs = [float(line.split(f'eps {eps}: ')[1].split()[0]) for line in lines]
        mean = 100 * sum(accs) / len(accs)
        assert abs(mean - metrics[f'eps{eps}/SEA/aAcc']) < 0.02
