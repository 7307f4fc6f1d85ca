# Clean (standard) training of the small UperNet-ConvNeXt on the synthetic dataset.
_base_ = [
    '../_base_/models/upernet_convnext_synthetic.py',
    '../_base_/datasets/synthetic_shapes.py',
    '../_base_/default_runtime.py',
    '../_base_/schedules/schedule_synthetic.py',
]
randomness = dict(seed=0)
