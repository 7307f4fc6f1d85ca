# Clean (standard) training of the small SegFormer (MiT) on the synthetic dataset,
# with the schedule of the small UperNet-ConvNeXt
# (upernet_convnext-micro_synthetic.py).
_base_ = [
    '../_base_/models/segformer_mit_synthetic.py',
    '../_base_/datasets/synthetic_shapes.py',
    '../_base_/default_runtime.py',
    '../_base_/schedules/schedule_synthetic.py',
]
randomness = dict(seed=0)
