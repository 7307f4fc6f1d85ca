"""Tiny deterministic model views for the attack tests (tests/conftest.py's
``attack_models`` fixture).

- ``LinearPixelModel(w, offset)``: per-pixel linear model ``z_k = w_k . x + offset_k``
  (``w`` (K, 3), ``offset`` (K, H, W)), the analytic oracle;
- ``tiny_net(num_classes=4, seed=0, scale=0.8)``: a 2-layer conv net (per-image
  independent, deterministic; larger ``scale``, less robust);
- ``MaskedGradients(model)``: the model with its input gradient negated, so
  that gradient attacks go the wrong way (gradient masking in its plainest
  form: the probes' trigger);
- ``Recorder(model)``: wraps a model view, records every forward input and counts
  forwards, forwarded images and backward passes;
- ``ImageCounter(model, images)``: wraps a model view and counts, per image of
  ``images``, the forwards with and without input gradients and the backward
  passes (each forwarded row is the image of ``images`` nearest to it in L2);
- ``PixelView(model, images, labels)``: the pixel-space view the Runner-free
  evaluator takes (``images``, ``labels``, ``predict()``, ``model``);
- ``batch(b, h, w, num_classes, seed, net)``: images in [0, 1] (with exact 0 and 1
  pixels) and labels equal to ``net``'s clean prediction on most pixels;
- ``assert_feasible(adv, x, eps, norm)``: in the eps-ball (eps in /255, tolerance
  1e-6) and in [0, 1];
- ``oracle(b, h, w, seed)``: a linear two-class problem with a known CE-optimal
  perturbation (``linf_optimum(eps)``, ``l2_optimum(eps)`` for 1x1 images).
"""

import types

import torch


class LinearPixelModel(torch.nn.Module):
    def __init__(self, w, offset):
        super().__init__()
        self.register_buffer('w', torch.as_tensor(w, dtype=torch.float32))
        self.register_buffer('offset', torch.as_tensor(offset, dtype=torch.float32))

    def forward(self, x):
        return torch.einsum('kc,bchw->bkhw', self.w, x) + self.offset


def tiny_net(num_classes=4, seed=0, scale=0.8):
    g = torch.Generator().manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1),
        torch.nn.Tanh(),
        torch.nn.Conv2d(16, num_classes, 3, padding=1),
    )
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return net.eval().requires_grad_(False)


class _ReversedGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return -grad


class MaskedGradients(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(_ReversedGradient.apply(x))


class _CountBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, recorder):
        ctx.recorder = recorder
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        ctx.recorder.n_backward += 1
        return grad, None


class Recorder:
    def __init__(self, model):
        self.model = model
        self.inputs = []
        self.n_forward = 0
        self.n_images = 0
        self.n_backward = 0

    def __call__(self, x):
        self.inputs.append(x.detach().clone())
        self.n_forward += 1
        self.n_images += x.shape[0]
        if x.requires_grad:
            x = _CountBackward.apply(x, self)
        return self.model(x)


class _CountImageBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, counter, ids):
        ctx.counter, ctx.ids = counter, ids
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        ctx.counter.backward.index_add_(0, ctx.ids, torch.ones_like(ctx.ids))
        return grad, None, None


class ImageCounter:
    """Counts per image what passes through the model: ``with_grad`` and
    ``without_grad`` forwards, ``backward`` passes (long ``(B,)``). A row is
    attributed to the image of ``images`` at the smallest L2 distance, so the
    images must lie further apart than twice the L2 norm of the largest
    perturbation (random images of :func:`batch`: for L-inf radii up to
    about 0.2)."""

    def __init__(self, model, images):
        self.model = model
        self.images = images.detach().clone()
        b = images.shape[0]
        self.with_grad = torch.zeros(b, dtype=torch.long)
        self.without_grad = torch.zeros(b, dtype=torch.long)
        self.backward = torch.zeros(b, dtype=torch.long)

    def __call__(self, x):
        dist = (x.detach()[:, None] - self.images[None]).flatten(2).norm(dim=2)
        ids = dist.argmin(1)
        if torch.is_grad_enabled() and x.requires_grad:
            self.with_grad.index_add_(0, ids, torch.ones_like(ids))
            x = _CountImageBackward.apply(x, self, ids)
        else:
            self.without_grad.index_add_(0, ids, torch.ones_like(ids))
        return self.model(x)

    @property
    def passes(self):
        """Forward+backward passes per image."""
        return self.backward

    @property
    def forwards(self):
        """Forward passes without a backward per image."""
        return self.with_grad + self.without_grad - self.backward


class PixelView:
    """The pixel-space view :class:`~mmseg_robust.evaluation.RobustnessEvaluator`
    takes (``images``, ``labels``, ``predict()``, ``model``) of a plain torch
    model and a batch."""

    def __init__(self, model, images, labels):
        self.model, self.images, self.labels = model, images, labels

    def __call__(self, x):
        return self.model(x)

    def predict(self):
        with torch.no_grad():
            logits = self.model(self.images)
        return logits, logits.argmax(1)


def separated_batch(b=4, h=8, w=8, num_classes=4, seed=0, net=None):
    """:func:`batch` with image ``i`` in ``[i / b, (i + 0.5) / b]``: images at
    least ``0.5 / b`` apart in every pixel (for :class:`ImageCounter`)."""
    images, labels = batch(b, h, w, num_classes, seed, net)
    images = (torch.arange(b).view(-1, 1, 1, 1) + 0.5 * images) / b
    if net is not None:
        labels = net(images).argmax(1)
    return images, labels


def batch(b=4, h=8, w=8, num_classes=4, seed=0, net=None):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(b, 3, h, w, generator=g)
    images[:, :, 0, 0] = 0.0
    images[:, :, -1, -1] = 1.0
    if net is None:
        labels = torch.randint(0, num_classes, (b, h, w), generator=g)
    else:
        labels = net(images).argmax(1)
        noise = torch.rand(b, h, w, generator=g) < 0.2
        random = torch.randint(0, num_classes, (b, h, w), generator=g)
        labels = torch.where(noise, random, labels)
    return images, labels


def assert_feasible(adv, x, eps, norm, tol=1e-6):
    dist = (adv - x).flatten(1)
    dist = dist.abs().amax(1) if norm == 'Linf' else dist.norm(dim=1)
    assert (dist <= eps / 255 + tol).all(), (dist * 255, eps)
    assert adv.min() >= 0 and adv.max() <= 1


def oracle(b=2, h=3, w=4, seed=0):
    # Two classes, z_k = w_k . x + offset_k per pixel. The offsets keep every
    # pixel correct by a wide margin inside the 2*eps ball, so CE increases
    # monotonically along -sign(w_y - w_other) and the CE-optimal L-inf
    # perturbation is the vertex -eps * sign(w_y - w_other) (L2, one pixel:
    # eps times the unit vector along -(w_y - w_other)).
    g = torch.Generator().manual_seed(seed)
    weights = torch.tensor([[0.8, -0.5, 0.3], [-0.2, 0.6, -0.7]])
    label_map = torch.randint(0, 2, (h, w), generator=g)
    onehot = torch.stack([label_map == 0, label_map == 1]).float()
    model = LinearPixelModel(weights, 6.0 * (onehot - 0.5))
    x = 0.3 + 0.4 * torch.rand(b, 3, h, w, generator=g)
    y = label_map.expand(b, h, w).clone()
    diff = (weights[label_map] - weights[1 - label_map]).permute(2, 0, 1)

    def linf_optimum(eps):
        return x - eps / 255 * diff.sign()

    def l2_optimum(eps):
        assert h == w == 1
        return x - eps / 255 * diff / diff.norm()

    return types.SimpleNamespace(
        model=model, x=x, y=y, linf_optimum=linf_optimum, l2_optimum=l2_optimum
    )
