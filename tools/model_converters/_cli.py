"""Shared command-line plumbing of the converters in this folder."""
import argparse
import os.path as osp
import sys

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
if REPO not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, REPO)


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument('src', help='source checkpoint')
    p.add_argument('dst', help='converted checkpoint to write')
    p.add_argument(
        '--trust-source',
        action='store_true',
        help='load SRC with weights_only=False (only for files you trust: '
        'unpickling can run code)')
    return p


def model_cfg(path: str) -> dict:
    """The ``model`` dict of an mmseg config file."""
    from mmengine.config import Config
    return Config.fromfile(path).model.to_dict()


def convert(args, fn, what: str, **kwargs) -> None:
    """Load ``args.src``, convert with ``fn(state_dict, **kwargs)``, write
    ``args.dst`` as ``{'state_dict', 'meta'}`` and print a summary."""
    from mmseg_robust.models.converters import (load_source_checkpoint,
                                                save_checkpoint)
    src = load_source_checkpoint(args.src, trust=args.trust_source)
    state, meta = fn(src, **kwargs)
    meta = dict(meta, converter=what, source=osp.basename(args.src))
    save_checkpoint(args.dst, state, meta)
    dropped = meta.get('dropped', [])
    print(f'{what}: converted {len(src)} source tensors into {len(state)} '
          f'({meta.get("arch", "")}); dropped {len(dropped)}'
          f'{": " + ", ".join(dropped[:6]) if dropped else ""}'
          f'{" ..." if len(dropped) > 6 else ""}; wrote {args.dst}')
