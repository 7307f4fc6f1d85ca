"""Threat model (docs/algorithms.md section 1): norms, eps units, projection, random
start, steepest-ascent direction."""

import warnings

import pytest
import torch

from mmseg_robust.attacks import AttackWarning, ThreatModel, canonical_norm, check_eps

pytestmark = pytest.mark.usefixtures('attack_one_thread')


def _images(b=3, h=5, w=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 3, h, w, generator=g)
    x[:, :, 0, 0] = 0.0
    x[:, :, -1, -1] = 1.0
    return x


def _dist(a, b, norm):
    d = (a - b).flatten(1)
    return d.abs().amax(1) if norm == 'Linf' else d.norm(dim=1)


@pytest.mark.parametrize(
    'name,expected',
    [
        ('Linf', 'Linf'),
        ('linf', 'Linf'),
        ('inf', 'Linf'),
        ('LINF', 'Linf'),
        ('L2', 'L2'),
        ('l2', 'L2'),
    ],
)
def test_norm_names_are_case_insensitive(name, expected):
    assert canonical_norm(name) == expected
    assert ThreatModel(8, name).norm == expected


@pytest.mark.parametrize('bad', ['L1', 'l0', '', None, 2])
def test_unknown_norm_names_the_allowed_values(bad):
    with pytest.raises(ValueError, match="'Linf'.*'L2'"):
        ThreatModel(8, bad)


@pytest.mark.parametrize('bad', [-1, -1e-9, float('nan'), float('inf'), 'eight'])
def test_bad_eps_raises(bad):
    with pytest.raises(ValueError, match='eps'):
        ThreatModel(bad, 'Linf')


def test_eps_is_in_255_units():
    assert check_eps(8) == 8.0
    assert ThreatModel(8, 'Linf').radius == pytest.approx(8 / 255)
    assert ThreatModel(0, 'L2').radius == 0.0


@pytest.mark.parametrize('norm', ['Linf', 'L2'])
def test_projection_lands_in_ball_and_box(norm):
    x = _images()
    tm = ThreatModel(8, norm)
    far = x + torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    p = tm.project(far, x)
    assert (_dist(p, x, norm) <= tm.radius + 1e-6).all()
    assert p.min() >= 0 and p.max() <= 1
    # a point already feasible is unchanged; projecting twice changes nothing
    assert torch.allclose(tm.project(p, x), p, atol=1e-7)
    inside = x + 0.25 * (p - x)
    assert torch.allclose(tm.project(inside, x), inside, atol=1e-7)


def test_linf_projection_clamps_each_coordinate():
    x = torch.full((1, 3, 1, 2), 0.5)
    x_adv = x + torch.tensor([0.5, -0.01, 0.02]).view(1, 3, 1, 1)
    p = ThreatModel(2.55, 'Linf').project(x_adv, x)  # radius 0.01
    expected = torch.tensor([0.51, 0.49, 0.51]).view(1, 3, 1, 1).expand_as(x)
    assert torch.allclose(p, expected, atol=1e-7)


def test_l2_projection_rescales_onto_the_sphere():
    x = torch.full((2, 3, 1, 1), 0.5)
    delta = torch.tensor([[0.3, 0.4, 0.0], [0.03, 0.04, 0.0]]).view(2, 3, 1, 1)
    p = ThreatModel(25.5, 'L2').project(x + delta, x)  # radius 0.1
    assert torch.allclose(p - x, torch.stack([delta[0] / 5, delta[1]]), atol=1e-7)


@pytest.mark.parametrize('norm', ['Linf', 'L2'])
def test_eps_zero_gives_exactly_the_clean_images(norm):
    x = _images()
    tm = ThreatModel(0, norm)
    assert torch.equal(tm.project(x + 0.3, x), x)
    assert torch.equal(tm.random_start(x), x)
    assert torch.equal(tm.random_start(x, seeds=[1, 2, 3]), x)


@pytest.mark.parametrize('norm', ['Linf', 'L2'])
def test_random_start_is_inside_ball_and_box(norm):
    x = _images(b=8)
    tm = ThreatModel(16, norm)
    for seeds in (None, list(range(8))):
        x0 = tm.random_start(x, seeds=seeds)
        assert (_dist(x0, x, norm) <= tm.radius + 1e-6).all()
        assert x0.min() >= 0 and x0.max() <= 1
        assert not torch.equal(x0, x)
    x0 = tm.random_start(x, radius=2 * tm.radius)
    assert (_dist(x0, x, norm) <= 2 * tm.radius + 1e-6).all()


def test_linf_random_start_is_uniform_in_the_box():
    x = torch.full((4, 3, 32, 32), 0.5)
    tm = ThreatModel(8, 'Linf')
    delta = (tm.random_start(x, seeds=[0, 1, 2, 3]) - x) / tm.radius
    # U[-1, 1]: mean 0, E|d| = 1/2, both signs, reaches close to the faces
    assert abs(delta.mean().item()) < 0.03
    assert abs(delta.abs().mean().item() - 0.5) < 0.03
    assert delta.max() > 0.99 and delta.min() < -0.99


def test_l2_random_start_radius_distribution():
    # uniform in a d-dim ball: radius r * U^(1/d), i.e. close to the sphere for
    # large d and spread for d = 3
    x = torch.full((400, 3, 1, 1), 0.5)
    tm = ThreatModel(25.5, 'L2')
    r = (tm.random_start(x) - x).flatten(1).norm(dim=1) / tm.radius
    assert r.max() <= 1 + 1e-6
    assert abs(r.pow(3).mean().item() - 0.5) < 0.07  # r^3 ~ U[0, 1]
    big = torch.full((4, 3, 16, 16), 0.5)
    rb = (tm.random_start(big) - big).flatten(1).norm(dim=1) / tm.radius
    assert (rb > 0.98).all()


@pytest.mark.parametrize('norm', ['Linf', 'L2'])
def test_per_image_seeds_make_random_start_batch_independent(norm):
    x = _images(b=4)
    tm = ThreatModel(8, norm)
    torch.manual_seed(0)
    full = tm.random_start(x, seeds=[10, 11, 12, 13])
    torch.manual_seed(123)  # the global RNG must not matter
    halves = torch.cat(
        [tm.random_start(x[:2], seeds=[10, 11]), tm.random_start(x[2:], seeds=[12, 13])]
    )
    assert torch.equal(full, halves)
    swapped = tm.random_start(x[[1, 0]], seeds=[11, 10])
    assert torch.equal(swapped, full[[1, 0]])
    other = tm.random_start(x, seeds=[10, 11, 12, 99])
    assert torch.equal(other[:3], full[:3]) and not torch.equal(other[3], full[3])


def test_global_rng_start_follows_the_global_seed():
    x = _images()
    tm = ThreatModel(8, 'Linf')
    torch.manual_seed(5)
    a = tm.random_start(x)
    torch.manual_seed(5)
    assert torch.equal(tm.random_start(x), a)


def test_direction():
    g = torch.tensor([[3.0, -4.0, 0.0], [0.0, 0.0, 0.0]]).view(2, 3, 1, 1)
    assert torch.equal(ThreatModel(8, 'Linf').direction(g), g.sign())
    d = ThreatModel(8, 'L2').direction(g)
    assert torch.allclose(d[0].flatten(), torch.tensor([0.6, -0.8, 0.0]))
    assert torch.equal(d[1], torch.zeros_like(d[1]))  # zero gradient, zero step


def test_eps_unit_checks():
    # L-inf: a small-integer fraction below 1 warns (8/255 meant as eps=8) ...
    for eps, meant in ((8 / 255, '8'), (0.03, '7.65'), (1 / 255, '1')):
        with pytest.warns(AttackWarning, match=rf'did you mean eps={meant} '):
            assert check_eps(eps, 'Linf') == eps
    # ... legitimate radii below one grey level do not, and a confirmed value
    # never does
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        for eps in (0.25, 0.5, 0.2, 0.1, 0.9, 1, 8):
            assert check_eps(eps, 'Linf') == eps
        for units in ('255', '/255', 255):
            assert check_eps(8 / 255, 'Linf', units) == 8 / 255
        assert check_eps(0.5, 'L2') == 0.5  # L2: checked against the image size
    with pytest.raises(ValueError, match="eps_units must be '255'.*eps=r\\*255"):
        check_eps(0.5, 'Linf', eps_units='1')
    with pytest.raises(ValueError, match=r'larger than the whole pixel range.*eps=8\?'):
        check_eps(2040, 'Linf')
    assert check_eps(2040) == 2040  # without a norm: no bound
    assert check_eps(2040, 'L2') == 2040
    assert check_eps(255, 'Linf') == 255
    with pytest.raises(ValueError, match='larger than the whole pixel range'):
        ThreatModel(eps=300, norm='inf')


def test_l2_radius_implausibly_small_for_the_image_size_warns():
    # eps=2.0 meant as 2.0 in [0, 1] units is read as 2/255: 0.018/255 per
    # coordinate on 3x64x64 images
    tm = ThreatModel(eps=2.0, norm='L2')
    with pytest.warns(AttackWarning, match=r'L2 eps=2 .*did you give the radius'):
        tm.check_size((2, 3, 64, 64))
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        tm.check_size((2, 3, 64, 64))  # once per threat model
        ThreatModel(eps=2.0, norm='L2', eps_units='255').check_size((2, 3, 64, 64))
        ThreatModel(eps=510, norm='L2').check_size((2, 3, 64, 64))  # 2.0 * 255
        ThreatModel(eps=2.0, norm='L2').check_size((2, 3, 8, 8))  # 0.14/255
        ThreatModel(eps=0, norm='L2').check_size((2, 3, 64, 64))
        ThreatModel(eps=0.5, norm='Linf').check_size((2, 3, 64, 64))
