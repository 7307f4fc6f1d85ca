"""Every code block of README.md and of the docs/ pages runs as written.

- Config snippets (Python blocks that assign config fields) are merged onto a
  shipped config as a config file next to it would be (``./my_config.py`` is a
  config that inherits the synthetic one), loaded with mmengine's ``Config``, and
  what they set is built without a Runner: the metrics through mmseg's
  ``METRICS`` registry, the loops' arguments bound to the loop classes'
  signatures, their attacks through ``ATTACKS`` (per eps, as the loops build
  them) and the training scheme through ``TRAIN_SCHEMES``.
- Other Python blocks run in a fresh interpreter.
- Shell blocks: every command's script (``tools/``, ``benchmarks/``, mmseg's
  dataset converters) and ``configs/`` path exists, every ``--option`` is one the
  script defines, ``make`` targets exist, and ``--cfg-options`` are applied as
  ``tools/test.py`` applies them (``evaluator.*`` through the preset code, other
  keys must exist in the config).

README's "From Python" section is checked by its own test (a model, a data
loader and the evaluator, against ``tools/test.py``), so it is left out here.
"""

import glob
import inspect
import os.path as osp
import re
import shlex
import subprocess
import sys
from argparse import ArgumentParser

import pytest

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
SYNTHETIC = osp.join(
    REPO, 'configs', 'synthetic', 'upernet_convnext-micro_synthetic.py'
)
#: a shipped 21-class VOC config: SEA's class weights need no data there
VOC = osp.join(
    REPO,
    'configs',
    'pirat',
    'upernet_convnext-t-cvst_pirat_8xb32-50e_voc12aug-473x473.py',
)
PAGES = ['README.md'] + sorted(
    osp.relpath(p, REPO) for p in glob.glob(osp.join(REPO, 'docs', '*.md'))
)
#: (page, section heading) left out: tested on their own
SKIPPED_SECTIONS = {('README.md', 'From Python')}
CONFIG_FIELDS = (
    '_base_',
    'custom_imports',
    'train_cfg',
    'val_cfg',
    'test_cfg',
    'val_evaluator',
    'test_evaluator',
    'optim_wrapper',
)
#: the launchers and the tool whose options they pass on
LAUNCHERS = {
    'tools/dist_train.sh': 'tools/train.py',
    'tools/slurm_train.sh': 'tools/train.py',
    'tools/dist_test.sh': 'tools/test.py',
    'tools/slurm_test.sh': 'tools/test.py',
    'benchmarks/gpu_check.sh': 'benchmarks/gpu_check.py',
    'benchmarks/gpu_prepare.sh': None,
}
#: commands that install software; not run by the tests
INSTALL_COMMANDS = ('pip', 'mim', 'git', 'pre-commit')


def code_blocks(page):
    """``(lang, text, line, section)`` of every fenced block of ``page``,
    ``section`` being the heading of level 3 or less it is under."""
    blocks = []
    section = None
    lang = None
    lines = []
    with open(osp.join(REPO, page), encoding='utf-8') as f:
        for i, line in enumerate(f, 1):
            if lang is None:
                m = re.match(r'^(#{1,3}) (.*)', line)
                if m:
                    section = m.group(2).strip()
                elif line.startswith('```'):
                    lang, start, lines = line[3:].strip(), i, []
            elif line.startswith('```'):
                blocks.append((lang, ''.join(lines), start, section))
                lang = None
            else:
                lines.append(line)
    return blocks


def _blocks(kind):
    out = []
    for page in PAGES:
        for lang, text, line, section in code_blocks(page):
            if (page, section) in SKIPPED_SECTIONS:
                continue
            if lang == kind:
                out.append(pytest.param(text, id=f'{page}:{line}'))
    return out


def _is_config(text):
    if re.search(r'^(import|from) ', text, re.M):
        return False
    assigned = re.findall(r'^([A-Za-z_]\w*)\s*=', text, re.M)
    return bool(assigned) and all(a in CONFIG_FIELDS for a in assigned)


PYTHON_BLOCKS = _blocks('python')
BASH_BLOCKS = _blocks('bash')


def test_the_pages_have_blocks_and_from_python_is_left_out():
    readme = code_blocks('README.md')
    assert any(s == 'From Python' for _, _, _, s in readme)
    skipped = [b for b in readme if b[3] == 'From Python']
    assert skipped and all(
        p.id != f'README.md:{b[2]}' for b in skipped for p in PYTHON_BLOCKS
    )
    assert len(PYTHON_BLOCKS) >= 8 and len(BASH_BLOCKS) >= 15


# ----------------------------------------------------------------- configs


def _registries():
    from mmengine.registry import init_default_scope

    import mmseg_robust  # noqa: F401  (registers the components)

    init_default_scope('mmseg')
    from mmseg.registry import LOOPS, METRICS

    from mmseg_robust.registry import ATTACKS, TRAIN_SCHEMES

    return LOOPS, METRICS, ATTACKS, TRAIN_SCHEMES


def _bind(cls, cfg, **positional):
    # type and _scope_ are the registry's, not the loop's
    kwargs = {k: v for k, v in cfg.items() if k != 'type' and not k.startswith('_')}
    inspect.signature(cls.__init__).bind(None, **positional, **kwargs)


def build_config(cfg, fields):
    """Build what the config fields ``fields`` set, without a Runner."""
    LOOPS, METRICS, ATTACKS, TRAIN_SCHEMES = _registries()
    for key in ('val_evaluator', 'test_evaluator'):
        if key in fields:
            metrics = cfg[key] if isinstance(cfg[key], list) else [cfg[key]]
            for metric in metrics:
                METRICS.build(
                    metric.to_dict() if hasattr(metric, 'to_dict') else metric
                )
    for key in ('val_cfg', 'test_cfg'):
        if key not in fields or 'Adversarial' not in cfg[key].get('type', ''):
            continue
        loop = cfg[key].to_dict()
        _bind(
            LOOPS.get(loop['type']), loop, runner=None, dataloader=None, evaluator=None
        )
        eps = loop.get('eps', 8)
        attacks = loop['attacks']
        attacks = [attacks] if isinstance(attacks, dict) else attacks
        for e in eps if isinstance(eps, (list, tuple)) else [eps]:
            for attack in attacks:
                ATTACKS.build(dict(attack, eps=e, ignore_index=255))
    if 'train_cfg' in fields and cfg.train_cfg.get('type') == 'AdversarialTrainLoop':
        loop = cfg.train_cfg.to_dict()
        _bind(LOOPS.get(loop['type']), loop, runner=None, dataloader=None)
        if isinstance(loop.get('scheme'), str):
            assert TRAIN_SCHEMES.get(loop['scheme']) is not None, loop['scheme']
        if loop.get('attack') is not None:
            ATTACKS.build(dict(loop['attack'], ignore_index=255))


def check_config_snippet(text, tmp_path):
    """Merge ``text`` onto the synthetic config and build what it sets."""
    from mmengine.config import Config

    configs = tmp_path / 'configs'
    (configs / 'my_project').mkdir(parents=True)
    # '../_base_/...' of a config in configs/<folder>/ finds the shipped bases
    (configs / '_base_').symlink_to(osp.join(REPO, 'configs', '_base_'))
    (configs / 'my_project' / 'my_config.py').write_text(f'_base_ = [{SYNTHETIC!r}]\n')
    source = text
    if not re.search(r'^_base_\s*=', text, re.M):
        source = f'_base_ = [{SYNTHETIC!r}]\n' + text
    path = configs / 'my_project' / 'snippet.py'
    path.write_text(source)
    cfg = Config.fromfile(str(path))
    fields = set(re.findall(r'^([A-Za-z_]\w*)\s*=', text, re.M))
    build_config(cfg, fields)
    if 'custom_imports' in fields:
        assert cfg.custom_imports.imports == ['mmseg_robust']


@pytest.mark.parametrize('text', [p for p in PYTHON_BLOCKS if _is_config(p.values[0])])
def test_config_snippet(text, tmp_path):
    check_config_snippet(text, tmp_path)


def test_config_check_catches_the_merged_metric(tmp_path):
    """The check fails on a snippet that merges into the base's IoUMetric
    (the README's snippets before ``_delete_=True``)."""
    with pytest.raises(TypeError, match='iou_metrics'):
        check_config_snippet(
            "test_evaluator = dict(type='RobustnessMetric')\n", tmp_path
        )


@pytest.mark.parametrize(
    'text', [p for p in PYTHON_BLOCKS if not _is_config(p.values[0])]
)
def test_python_snippet_runs(text):
    out = subprocess.run(
        [sys.executable, '-c', text],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]


# --------------------------------------------------------------- commands


def _drop_optional_brackets(token):
    """``[--resume]`` -> ``--resume``, ``[--cfg-options`` / ``...]`` (the
    brackets of optional arguments), keeping a value's own brackets
    (``evaluator.severities=[1,3]``)."""
    token = token[1:] if token.startswith('[') else token
    if token.endswith(']') and '[' not in token:
        token = token[:-1]
    return token


def commands(text):
    """The command lines of a shell block (continuations joined, comments and
    the ``[...]`` of optional arguments dropped), as token lists."""
    out = []
    for line in text.replace('\\\n', ' ').splitlines():
        tokens = shlex.split(line, comments=True)
        tokens = [_drop_optional_brackets(t) for t in tokens]
        tokens = [t for t in tokens if t and t != '...']
        if '&&' in tokens:  # a && b: check each
            while '&&' in tokens:
                i = tokens.index('&&')
                out.append(tokens[:i])
                tokens = tokens[i + 1 :]
        if tokens:
            out.append(tokens)
    return out


def _mmseg_tools():
    import mmseg

    return osp.join(osp.dirname(mmseg.__file__), '.mim')


def _script(tokens):
    """(script path in the repo or mmseg's tools, its arguments) or None."""
    while tokens and re.match(r'^[A-Z_]+=', tokens[0]):
        tokens = tokens[1:]  # environment variables
    if not tokens or tokens[0] in INSTALL_COMMANDS or tokens[0] == 'cd':
        return None
    if tokens[0] in ('python', 'bash'):
        tokens = tokens[1:]
    script = tokens[0]
    for root in (REPO, _mmseg_tools()):
        if osp.isfile(osp.join(root, script)):
            return osp.join(root, script), tokens[1:]
    raise AssertionError(f'{script}: no such file in the repository or mmseg')


def _options(script):
    """The options a script defines (with those of the converters' shared
    command line when it uses it)."""
    with open(script, encoding='utf-8') as f:
        source = f.read()
    options = set(re.findall(r"""['"](--[\w-]+)['"]""", source))
    if 'mmseg_robust.models.converters.cli' in source:
        options |= _options(
            osp.join(REPO, 'mmseg_robust', 'models', 'converters', 'cli.py')
        )
    return options


def _split_cfg_options(args):
    """(the arguments, the ``--cfg-options`` key=value pairs)."""
    if '--cfg-options' not in args:
        return args, []
    i = args.index('--cfg-options')
    rest = args[i + 1 :]
    n = next((j for j, a in enumerate(rest) if a.startswith('--')), len(rest))
    return args[:i] + rest[n:], rest[:n]


def check_cfg_options(pairs, config, attack=None):
    """Apply ``--cfg-options`` as tools/test.py does and build the result;
    ``attack``: the evaluator type a tool sets itself (robustness_curve.py's
    ``--attack``)."""
    from mmengine.config import Config, DictAction

    from mmseg_robust.engine.presets import (
        _num_classes,
        apply_robustness_evaluator,
        normalize_evaluator_options,
    )

    parser = ArgumentParser()
    parser.add_argument('--cfg-options', nargs='+', action=DictAction)
    options = parser.parse_args(['--cfg-options'] + pairs).cfg_options
    options = normalize_evaluator_options(options)
    cfg = Config.fromfile(config)
    for key in options:
        first = key.split('.')[0]
        assert first == 'evaluator' or first in cfg, f'{key}: not in {config}'
    cfg.merge_from_dict(options)
    if 'evaluator' not in cfg:
        return
    spec = cfg.evaluator
    spec = dict(type=spec) if isinstance(spec, str) else spec.to_dict()
    if attack is not None:
        spec.setdefault('type', attack)
    if _num_classes(cfg) not in (21, 151):
        # SEA computes the other datasets' class weights from their training
        # annotations: not what is checked here
        spec.setdefault('class_weights', [1.0] * _num_classes(cfg))
    apply_robustness_evaluator(cfg, spec)
    build_config(cfg, {'test_cfg', 'test_evaluator'})


@pytest.mark.parametrize('text', BASH_BLOCKS)
def test_shell_commands(text):
    with open(osp.join(REPO, 'Makefile')) as f:
        targets = set(re.findall(r'^([\w.-]+):', f.read(), re.M))
    for tokens in commands(text):
        if tokens[0] == 'make':
            for t in tokens[1:]:
                assert '=' in t or t in targets, f'make {t}: no such target'
            continue
        found = _script(tokens)
        if found is None:
            continue
        script, args = found
        rel = osp.relpath(script, REPO)
        tool = LAUNCHERS.get(rel, rel if script.endswith('.py') else None)
        args, pairs = _split_cfg_options(args)
        if tool is not None:
            known = _options(osp.join(REPO, tool) if rel in LAUNCHERS else script)
            for a in args:
                if a.startswith('--'):
                    assert a.split('=')[0] in known, f'{rel}: unknown option {a}'
        configs = [a for a in args if a.startswith('configs/')]
        for c in configs:
            assert osp.isfile(osp.join(REPO, c)), f'{c}: no such config'
        if pairs:
            config = osp.join(REPO, configs[0]) if configs else VOC
            attack = None
            if rel == 'tools/analysis_tools/robustness_curve.py':
                attack = (
                    args[args.index('--attack') + 1] if '--attack' in args else 'SEA'
                )
            check_cfg_options(pairs, config, attack)


# ------------------------------------------------------------------ pages


def test_every_docs_page_is_linked_from_the_readme():
    with open(osp.join(REPO, 'README.md'), encoding='utf-8') as f:
        readme = f.read()
    for page in PAGES[1:]:
        assert f']({page})' in readme, f'{page} is not linked from README.md'
