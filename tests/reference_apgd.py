"""A step-by-step port of the SEA reference's APGD loop (Croce, Singh & Hein,
ECCV 2024, code ``nmndeep/Robust-Segmentation``: ``apgd_train`` and the
progressive radius schedule ``apgd_largereps``; L-inf, ``track_loss='ce-avg'``,
``early_stop=True``), written independently of :mod:`mmseg_robust.attacks.apgd`
so that ``compat='reference'`` can be compared with it (docs/algorithms.md
section 3.2, reference behaviours).

What is the reference's here: the order of the loop body (update, forward,
returned point, step-size check, then the early-stop test, so every run makes
at least one update), the returned point (lowest pixel accuracy, ties to the
newer iterate), the first window's comparison with a row of zeros, the
restarts from the highest-CE iterate and the batch-level early stop. What is
ours: the attack objective (its value and gradient; the objectives are tested
on their own in test_attack_objectives.py) and the per-image random start.
Pixels with an ignored label are not supported (the reference's first accuracy
counts them as wrong, later ones as right).
"""

import torch
import torch.nn.functional as F


def _forward(model, objective, x_adv, y, need_grad):
    """Logits, gradient of the summed objective (None without ``need_grad``)
    and the tracked loss: CE averaged over the pixels of each image."""
    x_adv = x_adv.clone().requires_grad_(need_grad)
    with torch.set_grad_enabled(need_grad):
        logits = model(x_adv)
        grad = None
        if need_grad:
            (grad,) = torch.autograd.grad(objective(logits, y).sum(), x_adv)
    with torch.no_grad():
        ce = F.cross_entropy(logits, y, reduction='none')
        tracked = ce.view(len(y), -1).mean(-1)
    return logits.detach(), grad, tracked


def reference_apgd_run(model, objective, x, y, eps, n_iter, x_init):
    """One run at radius ``eps`` (``[0, 1]`` units) from ``x_init``; returns the
    lowest-accuracy iterate per image (the reference's ``x_best_adv``)."""
    b = len(x)
    x_adv = x_init.clone().clamp(0.0, 1.0)
    x_best, x_best_adv = x_adv.clone(), x_adv.clone()
    loss_steps = torch.zeros(n_iter, b)
    window = max(int(0.22 * n_iter), 1)
    window_min = max(int(0.06 * n_iter), 1)
    window_decrement = max(int(0.03 * n_iter), 1)
    step = 2.0 * eps * torch.ones(b, 1, 1, 1)

    logits, grad, loss = _forward(model, objective, x_adv, y, True)
    grad_best = grad.clone()
    acc = (logits.argmax(1) == y).float().view(b, -1).mean(-1)
    loss_best = loss.clone()
    loss_best_last_check = loss_best.clone()
    reduced_last_check = torch.ones(b, dtype=torch.bool)
    since_check = 0
    x_old = x_adv.clone()
    for i in range(n_iter):
        # momentum step (a = 1 at the first iteration)
        momentum = x_adv - x_old
        x_old = x_adv.clone()
        a = 0.75 if i > 0 else 1.0
        z = x_adv + step * torch.sign(grad)
        z = torch.clamp(torch.min(torch.max(z, x - eps), x + eps), 0.0, 1.0)
        z = x_adv + (z - x_adv) * a + momentum * (1 - a)
        x_adv = torch.clamp(torch.min(torch.max(z, x - eps), x + eps), 0.0, 1.0)
        logits, g, loss = _forward(model, objective, x_adv, y, i < n_iter - 1)
        if g is not None:
            grad = g
        # returned point: lowest accuracy so far, ties to the newer iterate
        avg_acc = (logits.argmax(1) == y).float().view(b, -1).mean(-1)
        newer = avg_acc <= acc
        acc = torch.min(acc, avg_acc)
        x_best_adv[newer] = x_adv[newer]
        # step-size control on the tracked CE
        loss_steps[i] = loss
        better = loss > loss_best
        x_best[better] = x_adv[better]
        grad_best[better] = grad[better]
        loss_best[better] = loss[better]
        since_check += 1
        if since_check == window:
            # row i - window of loss_steps is the last row (zeros) at the first
            # checkpoint: the first step counts as an increase when CE > 0
            increases = sum(
                (loss_steps[i - c] > loss_steps[i - c - 1]).float()
                for c in range(window)
            )
            halve = (increases <= 0.75 * window) | (
                ~reduced_last_check & (loss_best_last_check >= loss_best)
            )
            reduced_last_check = halve.clone()
            loss_best_last_check = loss_best.clone()
            step[halve] /= 2.0
            x_adv[halve] = x_best[halve]
            grad[halve] = grad_best[halve]
            since_check = 0
            window = max(window - window_decrement, window_min)
        # the batch-level early stop, after the update
        if acc.sum() == 0:
            break
    return x_best_adv


def reference_apgd_large_eps(model, objective, x, y, eps, n_iter, x_init):
    """The progressive radius schedule: ``[0.3, 0.3, rest]`` of the iterations
    at ``[2, 1.5, 1] * eps``; each stage starts from the previous stage's
    returned point projected onto its ball (``x_init`` is the first stage's
    start, drawn by the caller). Also returns the stages' starting points."""
    n_iters = [int(c * n_iter) for c in (0.3, 0.3)]
    n_iters.append(n_iter - sum(n_iters))
    starts = []
    x_adv = x_init
    for stage, (n, factor) in enumerate(zip(n_iters, (2.0, 1.5, 1.0))):
        r = factor * eps
        if stage > 0:
            x_adv = (x + (x_adv - x).clamp(-r, r)).clamp(0.0, 1.0)
        starts.append(x_adv.clone())
        x_adv = reference_apgd_run(model, objective, x, y, r, n, x_adv)
    return x_adv, starts
