"""Saving adversarial examples during a robustness evaluation (``--show-dir``)."""

import logging
import os.path as osp
from typing import Optional, Sequence

import numpy as np
import torch
from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.structures import PixelData
from mmengine.utils import mkdir_or_exist
from mmseg.structures import SegDataSample

from mmseg_robust.registry import HOOKS

__all__ = ['AdversarialVisualizationHook']


@HOOKS.register_module()
class AdversarialVisualizationHook(Hook):
    """Save the adversarial example of every attacked image of an
    :class:`~mmseg_robust.engine.AdversarialTestLoop`.

    Per image ``<stem>`` it writes to ``out_dir``:

    - ``<stem>.png``: mmseg's visualizer drawing of the *adversarial* image with
      the ground truth (left) and the adversarial prediction (right);
    - ``<stem>_panels.png``: clean image, adversarial image, amplified
      perturbation, ground truth, clean and adversarial prediction;
    - ``<stem>_example.npz``: the arrays behind them
      (:func:`mmseg_robust.reporting.load_example`), for reports.

    The example of an image is the one of the attack with the lowest pixel
    accuracy (SEA's worst case per image) at radius ``eps``; the test loop hands
    it over in its outputs (``adv_examples``, tensors until this hook converts
    them), and computes the examples only because this hook asks for them
    (:attr:`needs_adv_examples`). Images restored from the
    robustness cache of an earlier run were not attacked again and have none:
    the hook says how many it could not draw and how to draw them. ``tools/test.py
    --show-dir DIR`` adds this hook when an attack evaluator is active::

        custom_hooks = [dict(type='AdversarialVisualizationHook',
                             out_dir='work_dirs/sea/show', eps=8)]

    Args:
        out_dir (str): folder of the pictures.
        eps (float, optional): radius of the examples (/255 units); default the
            largest the loop attacks at.
        max_images (int, optional): stop saving after this many images.
        draw_visualizer (bool): save ``<stem>.png`` through mmseg's visualizer.
            Default: True.
        save_panels (bool): save ``<stem>_panels.png``. Default: True.
    """

    priority = 'LOW'
    #: the adversarial test loop keeps the examples only for hooks that ask
    needs_adv_examples = True

    def __init__(
        self,
        out_dir: str,
        eps: Optional[float] = None,
        max_images: Optional[int] = None,
        draw_visualizer: bool = True,
        save_panels: bool = True,
    ) -> None:
        self.out_dir = out_dir
        self.eps = eps
        self.max_images = max_images
        self.draw_visualizer = draw_visualizer
        self.save_panels = save_panels
        self._saved = 0
        self._cached = 0

    def before_test(self, runner) -> None:
        from mmseg_robust.engine.adversarial_loops import AdversarialTestLoop

        loop = runner.test_loop
        if not isinstance(loop, AdversarialTestLoop):
            raise ValueError(
                'AdversarialVisualizationHook saves adversarial examples and '
                f'needs an adversarial test loop, got {type(loop).__name__}: use '
                '--cfg-options evaluator=SEA (or another attack evaluator), or '
                "test_cfg=dict(type='AdversarialTestLoop', ...)"
            )
        radii = loop.eps_list
        if self.eps is not None and float(self.eps) not in radii:
            raise ValueError(
                f'examples requested at eps {self.eps} but the loop attacks at '
                f'eps {radii}; choose one of these'
            )
        self._key = float(max(radii) if self.eps is None else self.eps)
        self._saved = self._cached = 0
        mkdir_or_exist(self.out_dir)
        meta = runner.test_dataloader.dataset.metainfo
        self._palette = [tuple(int(v) for v in c) for c in meta['palette']]
        self._classes = list(meta.get('classes', []))
        print_log(
            f'Saving adversarial examples at eps {self._key:g}/255 to '
            f'{osp.abspath(self.out_dir)}',
            logger='current',
        )

    def after_test(self, runner) -> None:
        print_log(
            f'Adversarial examples of {self._saved} images written to '
            f'{osp.abspath(self.out_dir)}',
            logger='current',
        )
        if self._cached:
            print_log(
                f'{self._cached} images were restored from the robustness cache '
                'of an earlier run and not attacked again, so they have no '
                'adversarial example to draw. To draw them too, rerun with '
                '--cfg-options evaluator.resume=False (or another --work-dir).',
                logger='current',
                level=logging.WARNING,
            )

    def after_test_iter(
        self,
        runner,
        batch_idx: int,
        data_batch=None,
        outputs: Optional[Sequence] = None,
    ) -> None:
        from mmseg_robust.reporting import save_example, save_picture_grid

        for out in outputs or []:
            example = (out.get('adv_examples') or {}).get(self._key)
            if example is None:  # restored from the robustness cache
                self._cached += 1
                continue
            if self.max_images is not None and self._saved >= self.max_images:
                return
            example = example.to_numpy()
            stem = osp.join(self.out_dir, example['name'])
            save_example(example, stem + '_example.npz')
            if self.save_panels:
                save_picture_grid(
                    [example], stem + '_panels.png', self._palette, class_names=None
                )
            if self.draw_visualizer:
                self._draw(runner, example, stem + '.png')
            self._saved += 1

    def _draw(self, runner, example: dict, out_file: str) -> None:
        sample = SegDataSample()
        sample.gt_sem_seg = PixelData(
            data=torch.from_numpy(example['gt'].astype(np.int64))[None]
        )
        sample.pred_sem_seg = PixelData(
            data=torch.from_numpy(example['adv_pred'].astype(np.int64))[None]
        )
        image = _to_uint8(example['adv_image'])
        h, w = example['gt'].shape
        if image.shape[:2] != (h, w):
            import mmcv

            image = mmcv.imresize(image, (w, h))
        runner.visualizer.add_datasample(
            f'adv_eps{example["eps"]:g}_{example["name"]}',
            image,
            data_sample=sample,
            draw_gt=True,
            draw_pred=True,
            show=False,
            out_file=out_file,
        )


def _to_uint8(image: np.ndarray) -> np.ndarray:
    # C-contiguous: cv2 (drawing in mmseg's visualizer) refuses other layouts
    return np.ascontiguousarray(
        np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)
    )
