"""The command line shared by every checkpoint tool in ``tools/model_converters/``:
the ``SRC DST`` arguments, ``--unsafe-load``, ``--drop-normalizer``, reading the
source (:mod:`mmseg_robust.models.checkpoint`), writing the result and printing
where it was written.

A tool is a few lines::

    def main(argv=None) -> int:
        p = converter_parser(__doc__.splitlines()[0], drop_normalizer=True)
        args = p.parse_args(argv)
        convert_file(args, convert_revisiting_at_vit, 'revisiting_at_vit',
                     drop_normalizer=args.drop_normalizer)
        return 0
"""

import argparse
from typing import Callable, Sequence, Tuple

from mmseg_robust.models.checkpoint import (
    conversion_meta,
    load_checkpoint_file,
    save_checkpoint,
    unwrap_state_dict,
)

__all__ = [
    'add_drop_normalizer',
    'convert_file',
    'converter_parser',
    'load_source',
    'model_cfg',
    'print_written',
    'write_checkpoint',
]


def converter_parser(
    description: str,
    src: str = 'SRC',
    src_help: str = 'source checkpoint',
    dst: str = 'DST',
    dst_help: str = 'converted checkpoint to write',
    before: Sequence[Tuple[str, str]] = (),
    drop_normalizer: bool = False,
) -> argparse.ArgumentParser:
    """The argument parser of a converter: positional ``src`` and ``dst``
    (shown as ``SRC``/``DST`` or the given names) and ``--unsafe-load``.

    Args:
        description (str): the tool's one-line description.
        src, dst (str): how the two positionals are shown in the usage;
            ``args.src`` and ``args.dst`` either way.
        src_help, dst_help (str): their help texts.
        before (list[tuple[str, str]]): ``(name, help)`` of positionals that come
            before ``src`` (e.g. the DDC-AT export's ``config``).
        drop_normalizer (bool): add ``--drop-normalizer``
            (:func:`add_drop_normalizer`).
    """
    p = argparse.ArgumentParser(description=description)
    for name, help_text in before:
        p.add_argument(name, metavar=name.upper(), help=help_text)
    p.add_argument('src', metavar=src, help=src_help)
    p.add_argument('dst', metavar=dst, help=dst_help)
    p.add_argument(
        '--unsafe-load',
        action='store_true',
        help=f'read {src} with torch.load(weights_only=False): only for a file '
        'you trust (unpickling can run arbitrary code), if the safe loader '
        'refuses it',
    )
    if drop_normalizer:
        add_drop_normalizer(p)
    return p


def add_drop_normalizer(parser: argparse.ArgumentParser) -> None:
    """``--drop-normalizer`` of the revisiting-at backbone converters."""
    parser.add_argument(
        '--drop-normalizer',
        action='store_true',
        help='accept and drop a non-identity normalize.{mean,std} of SRC (PIR-AT '
        'fine-tunes the backbone on raw [0, 1] input, as the reference does); '
        'the values are kept in the meta of DST',
    )


def load_source(args, state_dict: bool = True):
    """Read ``args.src`` (safely unless ``args.unsafe_load``); its state dict
    (:func:`~mmseg_robust.models.checkpoint.unwrap_state_dict`), or with
    ``state_dict=False`` the whole loaded object."""
    obj = load_checkpoint_file(args.src, trust=args.unsafe_load)
    return unwrap_state_dict(obj, args.src) if state_dict else obj


def model_cfg(path: str) -> dict:
    """The ``model`` dict of an mmseg config file."""
    from mmengine.config import Config

    return Config.fromfile(path).model.to_dict()


def print_written(path: str, what: str = 'checkpoint') -> None:
    """The last lines of every tool: ``wrote <what>: <path>``."""
    print(f'wrote {what}: {path}')


def write_checkpoint(
    path: str, state_dict, meta: dict, what: str = 'checkpoint'
) -> None:
    """Write ``{'state_dict', 'meta'}`` (loadable with ``weights_only=True``)
    and say where."""
    save_checkpoint(path, state_dict, meta)
    print_written(path, what)


def convert_file(args, fn: Callable, what: str, **kwargs) -> tuple:
    """Read ``args.src``, convert it with ``fn(state_dict, **kwargs) -> (state
    dict, meta)``, write ``args.dst`` with the meta in the vocabulary of
    :data:`~mmseg_robust.models.checkpoint.CONVERSION_META_KEYS` and print a
    summary and the path written.

    Returns:
        tuple: ``(state dict, meta)`` as written.
    """
    src = load_source(args)
    state, meta = fn(src, **kwargs)
    details = dict(meta)
    meta = conversion_meta(what, args.src, details.pop('dropped', ()), **details)
    dropped = meta['dropped']
    print(
        f'{what}: converted {len(src)} source tensors into {len(state)} '
        f'({meta.get("arch", "")}); dropped {len(dropped)}'
        f'{": " + ", ".join(dropped[:6]) if dropped else ""}'
        f'{" ..." if len(dropped) > 6 else ""}'
    )
    write_checkpoint(args.dst, state, meta)
    return state, meta
