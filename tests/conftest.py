# --- foundation fixtures ---
"""Shared fixtures: repository paths, the synthetic dataset, running the tools."""

import os
import os.path as osp
import subprocess
import sys

import pytest

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
SMALL_CONFIG = osp.join(
    REPO, 'configs', 'synthetic', 'upernet_convnext-micro_synthetic.py'
)
# A small split so the end-to-end tests spend their time in the tools, not in data.
TEST_SPLITS = dict(train=48, val=16)


@pytest.fixture(scope='session')
def repo_root():
    return REPO


@pytest.fixture(scope='session')
def synthetic_root(tmp_path_factory):
    """A small synthetic dataset generated once per test session."""
    from mmseg_robust.datasets import generate_synthetic_dataset

    root = str(tmp_path_factory.mktemp('data') / 'synthetic_shapes')
    return generate_synthetic_dataset(root, splits=TEST_SPLITS)


def _data_options(root, splits=TEST_SPLITS):
    """--cfg-options that point every dataloader of a synthetic config at ``root``."""
    opts = []
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        opts += [
            f'{loader}.dataset.data_root={root}',
            f'{loader}.dataset.generator_cfg.splits.train={splits["train"]}',
            f'{loader}.dataset.generator_cfg.splits.val={splits["val"]}',
            f'{loader}.num_workers=0',
            f'{loader}.persistent_workers=False',
        ]
    return opts


# A torch/gloo teardown abort on CPU: a rank that finished its work sometimes
# dies in the C++ runtime's exit ("terminate called without an active
# exception", exit code -6), seen about once per full suite run in a multi-
# process launch (2026-11-30), also with the process group destroyed at exit.
TEARDOWN_ABORT = 'terminate called without an active exception'


def _run_tool(args, cwd=REPO, timeout=600, env=None):
    """Run a command with this interpreter's environment; fail with its output.

    A multi-process launch that fails only by the teardown abort above is run
    once more (the output of both runs is returned, marked); any other failure,
    or the abort twice, fails the test.
    """
    full_env = dict(os.environ)
    full_env['PATH'] = osp.dirname(sys.executable) + os.pathsep + full_env['PATH']
    full_env.setdefault('OMP_NUM_THREADS', '1')
    full_env.update(env or {})

    def run():
        return subprocess.run(
            args,
            cwd=cwd,
            env=full_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
        )

    proc = run()
    prefix = ''
    if proc.returncode != 0 and TEARDOWN_ABORT in proc.stdout:
        prefix = (
            f'[run_tool: teardown abort, ran again]\n'
            f'{proc.stdout}\n[run_tool: second run]\n'
        )
        proc = run()
    if proc.returncode != 0:
        raise AssertionError(
            f'{" ".join(map(str, args))} failed '
            f'({proc.returncode}):\n{proc.stdout[-6000:]}'
        )
    return prefix + proc.stdout


@pytest.fixture(scope='session')
def data_options():
    """``data_options(root)`` -> --cfg-options pointing a synthetic config at root."""
    return _data_options


@pytest.fixture(scope='session')
def run_tool():
    """``run_tool(args, cwd=REPO, timeout=600, env=None)`` -> combined output."""
    return _run_tool


def _test_module(filename):
    """A helper module of tests/, imported by path (the tests run in importlib
    mode, and mmseg's wheel owns the top-level name ``tests``)."""
    import importlib.util

    name = '_mmseg_robust_tests_' + filename[:-3]
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            name, osp.join(REPO, 'tests', filename)
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope='session')
def tools_in_one_process():
    """tests/tools_in_one_process.py: ``main(argv)`` runs stock tools here."""
    return _test_module('tools_in_one_process.py')


@pytest.fixture
def reset_mmengine():
    """Reset mmengine's singletons (loggers, message hub, visualizer, default
    scope) after a test that builds Runners in this process, as mmengine's
    RunnerTestCase does."""
    yield
    _test_module('tools_in_one_process.py').reset_singletons()


@pytest.fixture(scope='session')
def reference_apgd():
    """tests/reference_apgd.py: a port of the SEA reference's APGD loop
    (``reference_apgd_run``, ``reference_apgd_large_eps``)."""
    return _test_module('reference_apgd.py')


@pytest.fixture(scope='session')
def tiny_models():
    """tests/tiny_models.py: ``tiny_segmentor_cfg(decode_head, num_classes=4)``
    (a narrow ResNet EncoderDecoder dict) and ``trained_like(model)``."""
    return _test_module('tiny_models.py')


@pytest.fixture(scope='session')
def small_config():
    return SMALL_CONFIG


# --- end foundation fixtures ---


# --- attack fixtures ---
@pytest.fixture(scope='session')
def attack_models():
    """Tiny deterministic model views for the attack tests (tests/test_attack_*.py).

    Returns a namespace with:
      - ``linear(w, offset)``: per-pixel linear model ``z_k = w_k . x + offset_k``
        (``w`` (K, 3), ``offset`` (K, H, W)), the analytic oracle;
      - ``tiny_net(num_classes=4, seed=0, scale=0.8)``: a 2-layer conv net
        (per-image independent, deterministic; larger ``scale``, less robust);
      - ``Recorder(model)``: wraps a model view, records every forward input and
        counts forwards, forwarded images and backward passes;
      - ``batch(b, h, w, num_classes, seed, net)``: images in [0, 1] (with exact 0 and
        1 pixels) and labels equal to ``net``'s clean prediction on most pixels;
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

    return types.SimpleNamespace(
        linear=LinearPixelModel,
        tiny_net=tiny_net,
        Recorder=Recorder,
        batch=batch,
        assert_feasible=assert_feasible,
        oracle=oracle,
    )


@pytest.fixture
def attack_one_thread():
    """Run a test with one intra-op torch thread, then restore the setting.

    The attack tests use tiny tensors: extra threads only spin, and on a busy
    machine (or under pytest -n 2 on two cores) that makes them ~100x slower.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- end attack fixtures ---


# --- miniature real-format datasets ---
def _mini_datasets_module():
    return _test_module('mini_datasets.py')


@pytest.fixture(scope='session')
def mini_datasets():
    """The generator module tests/mini_datasets.py (counts, image lists, makers)."""
    return _mini_datasets_module()


@pytest.fixture(scope='session')
def mini_voc(tmp_path_factory):
    """data_root (``.../VOCdevkit/VOC2012``) of a miniature VOC 2012 + SBD."""
    root = str(tmp_path_factory.mktemp('mini_voc'))
    return _mini_datasets_module().make_mini_voc(root)


@pytest.fixture(scope='session')
def mini_ade20k(tmp_path_factory):
    """data_root (``.../ade/ADEChallengeData2016``) of a miniature ADE20K."""
    root = str(tmp_path_factory.mktemp('mini_ade20k'))
    return _mini_datasets_module().make_mini_ade20k(root)


@pytest.fixture(scope='session')
def mini_cityscapes(tmp_path_factory):
    """data_root (``.../cityscapes``) of a miniature converted Cityscapes."""
    root = str(tmp_path_factory.mktemp('mini_cityscapes'))
    return _mini_datasets_module().make_mini_cityscapes(root)


# --- end miniature real-format datasets ---
