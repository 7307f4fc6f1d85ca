"""Batch composition schemes of adversarial training (docs/algorithms.md section 5).

A scheme decides, per iteration and per GPU, which images of the batch the
attack runs on, which of them the update sees adversarially, and what else the
update needs (DDC-AT's division labels). :class:`AdversarialTrainLoop` selects
one by name (``scheme='pirat'``) from :data:`mmseg_robust.registry.TRAIN_SCHEMES`;
a new scheme is a registered subclass of :class:`TrainScheme`::

    from mmseg_robust.registry import TRAIN_SCHEMES

    @TRAIN_SCHEMES.register_module(name='quarter')
    class QuarterAdversarial(TrainScheme):
        def attacked_indices(self, batch_size):
            return list(range(batch_size - batch_size // 4, batch_size))

    train_cfg = dict(type='AdversarialTrainLoop', scheme='quarter', ...)
"""

from typing import Dict, List, Sequence

import torch
from mmengine.structures import PixelData

from mmseg_robust.registry import TRAIN_SCHEMES

__all__ = ['DDCATScheme', 'PIRATScheme', 'SATScheme', 'TrainScheme']


class TrainScheme:
    """How one iteration's training batch is composed.

    The loop calls, per iteration (``b`` the batch size on this GPU):

    1. :meth:`attacked_indices` (``b``) and :meth:`images_to_attack` (``b``);
    2. the attack on ``images_to_attack``, then, still inside the attack
       context (eval mode), :meth:`extra_labels`;
    3. :meth:`compose`: the batch ``train_step`` gets.
    """

    #: the name the scheme is registered (and selected in configs) under
    name = ''

    def attacked_indices(self, batch_size: int) -> List[int]:
        """The images of the batch the update sees adversarially."""
        raise NotImplementedError

    def images_to_attack(self, batch_size: int) -> List[int]:
        """The images the attack runs on (default: the attacked ones)."""
        return self.attacked_indices(batch_size)

    def extra_labels(
        self,
        view,
        adv_images: torch.Tensor,
        to_attack: Sequence[int],
        attacked: Sequence[int],
    ) -> Dict[str, torch.Tensor]:
        """Additional per-pixel labels for the update, ``{field: (b, H, W)}``
        with one row per image of the batch (default: none).

        Called inside the attack context (eval mode, parameters frozen) with the
        attack's pixel view of ``to_attack`` and its adversarial images.
        """
        return {}

    def compose(
        self,
        data_batch: dict,
        adv_inputs: Sequence[torch.Tensor],
        to_attack: Sequence[int],
        attacked: Sequence[int],
        extra: Dict[str, torch.Tensor],
    ) -> dict:
        """The batch for ``train_step``: the loader's raw inputs with the
        ``attacked`` ones replaced by their adversarial version
        (``adv_inputs``, raw like the loader's, one per image of
        ``to_attack``), and the ``extra`` labels set on new data samples."""
        attacked = set(attacked)
        inputs = list(data_batch['inputs'])
        for j, i in enumerate(to_attack):
            if i in attacked:
                inputs[i] = adv_inputs[j]
        samples = data_batch['data_samples']
        if extra:
            samples = [
                _with_fields(s, {k: v[i : i + 1] for k, v in extra.items()})
                for i, s in enumerate(samples)
            ]
        return dict(inputs=inputs, data_samples=samples)


@TRAIN_SCHEMES.register_module(name='pirat')
class PIRATScheme(TrainScheme):
    """PIR-AT: the update sees adversarial images only."""

    name = 'pirat'

    def attacked_indices(self, batch_size: int) -> List[int]:
        return list(range(batch_size))


@TRAIN_SCHEMES.register_module(name='sat')
class SATScheme(TrainScheme):
    """SAT: on each GPU the first half of the batch clean, the second half
    adversarial."""

    name = 'sat'

    def attacked_indices(self, batch_size: int) -> List[int]:
        if batch_size < 2:
            raise ValueError(
                f'{self.name} trains on a first half of clean and a second '
                'half of adversarial images per GPU: the batch size per GPU '
                'must be at least 2'
            )
        return list(range(batch_size // 2, batch_size))


@TRAIN_SCHEMES.register_module(name='ddcat')
class DDCATScheme(SATScheme):
    """DDC-AT: as SAT, but the attack runs on the whole batch and every image
    gets the division labels ``gt_division`` (needs a DDC-AT decode head)."""

    name = 'ddcat'

    def images_to_attack(self, batch_size: int) -> List[int]:
        return list(range(batch_size))

    def extra_labels(self, view, adv_images, to_attack, attacked):
        """(docs/algorithms.md, DDC-AT) 1 where the eval-mode routed prediction
        differs between the clean and the adversarial input, for the clean
        half; all zeros for the adversarial half."""
        from mmseg_robust.models.decode_heads import division_labels

        assert list(to_attack) == list(range(len(to_attack)))
        with torch.no_grad():
            clean = view.routed_prediction(view.images)
            adv_pred = view.routed_prediction(adv_images)
        division = division_labels(clean, adv_pred)
        for i in attacked:
            division[i] = 0
        return {'gt_division': division.long()}


def _with_fields(sample, fields: Dict[str, torch.Tensor]):
    """A new data sample with the fields and metainfo of ``sample`` plus
    ``fields`` as ``PixelData`` (the loader's sample is left as it was: a shallow
    copy would share mmengine's field registry and list a field the original
    lacks)."""
    new = sample.new()
    for name, data in fields.items():
        new.set_field(PixelData(data=data), name)
    return new
