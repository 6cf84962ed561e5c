"""The training step by hand: forward, loss and gradients of the common models without autograd.

A training step of `experiment=modular` at batch 8 is about a hundred tiny tensor ops; on a CPU
each costs microseconds of dispatch, and autograd adds a recorded graph node for each and
evaluates it again in backward. For models whose training forward is hard top-k routing into
module banks, `hand_step` returns a `HandStep` that runs the same forward ops and, instead of
autograd, the ops autograd's backward runs for them (the same kernels on the same shapes), so
losses and gradients are bit for bit those of `loss.backward()` (tests/test_step.py), at about
half the CPU time. Covered: `ModularNet` with one module per slot (`shared: false`, no
`skip_output`) whose routers are all `TopKRouter`s (learned or known, no Gumbel noise, one
router row: one task), and `MLP` without pruning masks on one task; the router method must add
no loss term (no `entropy` or `duplicate` regulariser, no surrogate). Everything else trains
through autograd, as before (`hand_step` returns None).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from modnets.models import MLP, ModularNet, ModuleBank
from modnets.routers import Router, TopKRouter, topk_mask


def hand_step(model: torch.nn.Module, method: Router | None) -> HandStep | None:
    """A `HandStep` for this model and router method, or None where autograd must do it."""
    if method is not None and (type(method).loss is not Router.loss or method.entropy or method.duplicate):
        return None
    if type(model) is MLP:
        plain = model.masks is None and model.n_tasks == 1 and type(model.net) is ModuleBank
        return HandStep(model, [], [model.net], None) if plain else None
    if type(model) is not ModularNet or model.shared or model.skip_output:
        return None
    selectors = [*model.routers, model.output_router]
    if any(type(r) is not TopKRouter or r.noisy or r.logits.shape[1] != 1 for r in selectors):
        return None
    if any(type(b) is not ModuleBank for b in model.banks):
        return None
    return HandStep(model, list(model.routers), list(model.banks), model.output_router)


class HandStep:
    """`step(x, y)`: the training forward on inputs x [R, B, ...], the per-replicate mean BCE
    losses [R] against targets y [R, B, outputs], and the gradient of their sum accumulated into
    every trainable parameter's `.grad` (as `losses.sum().backward()` would).

    The modules' weights are multiplied through views in the layouts the products need, made once
    (`prepare`) and made again when a parameter no longer lives where they point (an optimizer
    that moved the parameters into its buffer); activations stay in the layout [R * n, B, width]
    of the products. Every product and reduction gets operands of the shapes and strides
    autograd's path gives it, so the numbers are the same bits with about half the tensor ops."""

    def __init__(self, model, routers: list[TopKRouter], banks: list[ModuleBank], output_router: TopKRouter | None):
        self.model = model
        self.routers = [Selector(r) for r in routers]
        self.banks = [Bank(b) for b in banks]
        self.output_router = Selector(output_router) if output_router is not None else None
        self.lanes: dict[int, bool] = {}  # batch size -> whether `lane_step` may run it
        self.loss_grads: dict[tuple, torch.Tensor] = {}  # logits' shape -> d(sum of mean losses) / d(each term)
        self.at: list[int] = []  # where each weight and bias lived when `prepare` ran

    def prepare(self) -> None:
        """(Re)make the views of the weights every step multiplies with."""
        for bank in self.banks:
            bank.prepare()
        self.at = [p.data_ptr() for bank in self.banks for p in bank.params]

    @torch.no_grad()  # the functions below run inside it: they record no graph
    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        R, B = x.shape[:2]
        if self.output_router is not None and R >= LANES and x.device.type == "cpu":
            if B not in self.lanes:
                self.lanes[B] = lanes_fit(self, B)
            if self.lanes[B]:
                return lane_step(self, x, y)
        if self.at != [p.data_ptr() for bank in self.banks for p in bank.params]:  # a microsecond: safe by itself
            self.prepare()
        if self.output_router is None:  # MLP: one bank of one module on the flattened input
            h, bank_saved = bank_forward(self.banks[0], x.reshape(R, B, -1), R, 1)
            logits = h.view(R, B, -1)
            losses, grad = self.loss_and_grad(logits, y)
            bank_backward(self.banks[0], bank_saved, grad.view(R, B, 1, -1), need_input=False)
            return losses
        saved, h = [], x
        for router, bank in zip(self.routers, self.banks):
            picked, router_saved = select_forward(router, h)  # [R * consumers, B, k]
            h, bank_saved = bank_forward(bank, picked, R, router.logits.shape[3])
            h = h.view(R, -1, B).transpose(1, 2)  # [R, B, consumers]: the outputs of a layer's modules
            saved.append((router_saved, bank_saved))
        picked, out_saved = select_forward(self.output_router, h, consumers_first=False)
        logits = picked.view(R, B, self.output_router.k, -1)[:, :, :, 0]
        losses, grad = self.loss_and_grad(logits, y)
        grad = select_backward(self.output_router, out_saved, grad.unsqueeze(3), need_input=True)  # [R, B, width]
        grad = grad.unsqueeze(-1)  # [R, B, n, 1]: the last layer's output gradient of the bank below
        for i in reversed(range(len(saved))):
            router_saved, bank_saved = saved[i]
            grad = bank_backward(self.banks[i], bank_saved, grad, need_input=True)  # [R * n, B, k]
            n = self.routers[i].logits.shape[3]
            grad = grad.view(R, n, B, -1).permute(0, 2, 3, 1)  # [R, B, k, n]
            grad = select_backward(self.routers[i], router_saved, grad, need_input=i > 0)
            grad = grad.unsqueeze(-1) if grad is not None else None
        return losses

    def loss_and_grad(self, logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`loss_and_grad` with the constant factor of the gradient made once per shape."""
        key = (*logits.shape, logits.device)
        if key not in self.loss_grads:
            self.loss_grads[key] = loss_grad_factor(logits)
        per_output = F.binary_cross_entropy_with_logits(logits, y, reduction="none")
        return per_output.mean((1, 2)), torch.sigmoid(logits).sub_(y).mul_(self.loss_grads[key])


def loss_grad_factor(logits: torch.Tensor) -> torch.Tensor:
    """The gradient of the sum of each replicate's mean over [B, outputs] with respect to each term,
    as autograd's SumBackward and MeanBackward make it (1 / (B * outputs), expanded)."""
    R, B, n = logits.shape
    return logits.new_ones(()).expand(R)[:, None, None].expand(R, B, n) / (B * n)


def loss_and_grad(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each replicate's mean BCE loss of logits [R, B, outputs], and the gradient of their sum with
    respect to the logits, as autograd computes it (SumBackward, MeanBackward, then
    binary_cross_entropy_with_logits_backward)."""
    per_output = F.binary_cross_entropy_with_logits(logits, y, reduction="none")
    return per_output.mean((1, 2)), torch.sigmoid(logits).sub_(y).mul_(loss_grad_factor(logits))


class Selector:
    """A `TopKRouter`'s logits and arity, read without nn.Module's attribute lookup (the same
    Parameter objects: the optimizer and checkpoints update them in place), and its current `tau`."""

    __slots__ = ("router", "logits", "k")

    def __init__(self, router: TopKRouter):
        self.router, self.logits, self.k = router, router.logits, router.k

    @property
    def tau(self) -> float:
        return self.router.tau  # the method's schedule sets it every epoch


class Bank:
    """A `ModuleBank`'s weights and biases (the same Parameter objects), per layer, and the views
    of them a step multiplies with (`prepare`): weights [R * n, in, out] and transposed, biases [R, n, 1, out]."""

    __slots__ = ("weights", "biases", "params", "w", "wt", "b")

    def __init__(self, bank: ModuleBank):
        self.weights, self.biases = list(bank.weights), list(bank.biases)
        self.params = [*self.weights, *self.biases]

    def prepare(self) -> None:
        self.w = [w.detach().reshape(w.shape[0] * w.shape[1], *w.shape[2:]) for w in self.weights]
        self.wt = [w.transpose(1, 2) for w in self.w]
        self.b = [b.detach().unsqueeze(2) for b in self.biases]


def accumulate(p: torch.nn.Parameter, grad: torch.Tensor) -> None:
    """What autograd's AccumulateGrad does with a new gradient of a leaf."""
    if p.grad is None:
        p.grad = grad.clone(memory_format=torch.contiguous_format)
    else:
        p.grad.add_(grad)


def select_forward(router: Selector, h: torch.Tensor, consumers_first: bool = True) -> tuple[torch.Tensor, tuple]:
    """`TopKRouter`'s training forward on one router row: h [R, B, width] -> the picked inputs
    (a batched matmul with the hard top-k mask), [R * consumers, B, k] when `consumers_first`
    (a module bank's layout) else [R, B, k * consumers], and what backward needs."""
    logits = router.logits  # [R, 1, width, consumers]
    R, _, W, n = logits.shape
    k = router.k
    idx = logits.topk(k, dim=2).indices  # [R, 1, k, consumers]: `topk_mask`, made as [R, width, k * consumers]
    mask = torch.zeros(R, W, k * n, device=logits.device).scatter_(1, idx.view(R, 1, k * n), 1.0)
    out = torch.bmm(h, mask)
    if consumers_first:
        out = out.view(R, -1, k, n).permute(0, 3, 1, 2).reshape(R * n, -1, k)
    s = torch.sigmoid(logits / router.tau if router.tau != 1 else logits) if logits.requires_grad else None  # x / 1 is x
    return out, (h, mask, s)


def select_backward(router: Selector, saved: tuple, grad: torch.Tensor, need_input: bool) -> torch.Tensor | None:
    """Gradients of `select_forward` from grad [R, B, k, consumers]: into the logits through the
    straight-through estimator (sigmoid(logits / tau)), and returned for h [R, B, width] when `need_input`."""
    h, mask, s = saved
    R, W, _ = mask.shape
    k, n = grad.shape[2:]
    g = grad.reshape(R, -1, k * n)
    if s is not None:  # learned: the gradient reaches the logits as if the mask were hard + s - s.detach()
        grad_mask = h.transpose(1, 2).bmm(g).view(R, 1, W, k, n).sum(3)
        grad_logits = torch.ops.aten.sigmoid_backward(grad_mask, s)
        accumulate(router.logits, grad_logits / router.tau if router.tau != 1 else grad_logits)
    return g.bmm(mask.transpose(1, 2)) if need_input else None


def bank_forward(bank: Bank, x: torch.Tensor, R: int, n: int) -> tuple[torch.Tensor, tuple]:
    """`ModuleBank.forward` on x [R * n, B, in] (its ops, in their own layout): the outputs
    [R * n, B, out], and each layer's input and activation for backward."""
    B = x.shape[1]
    last = len(bank.w) - 1
    inputs, activations = [], []
    for i, (w, b) in enumerate(zip(bank.w, bank.b)):
        inputs.append(x)
        x = torch.bmm(x, w)
        x.view(R, n, B, -1).add_(b)
        if i < last:
            x.relu_()
            activations.append(x)
    return x, (inputs, activations, R, n)


def bank_backward(bank: Bank, saved: tuple, grad: torch.Tensor, need_input: bool) -> torch.Tensor | None:
    """Gradients of `bank_forward` from grad [R, B, n, out] into every weight and bias; returned
    for the bank's input, [R * n, B, in], when `need_input`."""
    inputs, activations, R, n = saved
    B = grad.shape[1]
    weights = bank.weights
    for i in reversed(range(len(weights))):
        if i < len(activations):
            grad = torch.ops.aten.threshold_backward(grad, activations[i], 0)
            accumulate(bank.biases[i], grad.view(R, n, B, -1).sum(2))
        else:  # the output layer's gradient comes in the caller's layout [R, B, n, out]
            accumulate(bank.biases[i], grad.sum(1))
            grad = grad.transpose(1, 2).reshape(R * n, B, -1)
        accumulate(weights[i], inputs[i].transpose(1, 2).bmm(grad).view(weights[i].shape))
        if i > 0 or need_input:
            grad = grad.bmm(bank.wt[i])
    return grad if need_input else None


# Replicates as lanes. With many replicates each bmm above multiplies thousands of tiny matrices
# (8 x 2 by 2 x 12), one at a time, and the elementwise ops between them run on rows of 12 or
# fewer contiguous floats. `LaneStep` runs the same step with the replicate dimension last and
# contiguous: every matrix product becomes a few elementwise multiply-adds over all replicates
# at once. It is bit for bit the bmm path because torch's CPU bmm multiplies matrices whose
# rows x inner x columns is under `SMALL_BMM` with a plain loop, each entry `0 + a0*b0 + a1*b1
# + ...` in order with separate roundings, which `dot` repeats; the sums over the batch (bias
# gradients, the straight-through sum over k) and the loss run in the old layout, on copies.
SMALL_BMM = 400  # torch's bound (aten bmm_out_or_baddbmm_) for its plain-loop small-matrix kernel
# Replicates from which the lane layout is faster. One step of `experiment=modular` on a 2-core
# CPU, 2 threads, lanes / bmm path (medians of 9 interleaved rounds): 1.8-2.0 at R = 64-128,
# 1.6 at 256, 1.07 at 512, 1.0 at 768, 0.94-1.05 at 1024, 0.85 at 2048; whole training runs at
# R = 1024 (3 alternating pairs): 18.3 s in lanes, 19.1 s on the bmm path. The bmm path runs about
# 125 ops a step at any R; the lane step several hundred, which pay off only over ~1000 replicates.
LANES = 1024


def to_lanes(t: torch.Tensor) -> torch.Tensor:
    """[R, ...] -> [..., R], contiguous."""
    R = t.shape[0]
    return t.reshape(R, -1).t().contiguous().view(*t.shape[1:], R)


def from_lanes(t: torch.Tensor) -> torch.Tensor:
    """[..., R] -> [R, ...], a view."""
    return t.movedim(-1, 0)


def dot(pairs) -> torch.Tensor:
    """sum of a * b over the pairs, as bmm's small-matrix loop adds them: from +0, in order,
    each product and sum rounded alone (no fused multiply-add)."""
    acc = product = None
    for a, b in pairs:
        if acc is None:
            acc = torch.mul(a, b)
            product = torch.empty_like(acc)  # reused: a fresh tensor per product costs more than the product
        else:
            acc.add_(torch.mul(a, b, out=product))
    return acc.add_(0.0)  # 0 + a0*b0 + ... differs from a0*b0 + ... only in giving +0 for -0


def lanes_fit(step: HandStep, batch: int) -> bool:
    """Whether every matrix product of a step at this batch size is one of bmm's small ones."""
    sizes = [s.logits.shape[2] * s.k * s.logits.shape[3] for s in [*step.routers, step.output_router]]
    sizes += [w.shape[2] * w.shape[3] for bank in step.banks for w in bank.weights]
    return max(sizes) * batch < SMALL_BMM


def lane_step(step: HandStep, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """`HandStep.__call__` of a ModularNet in the lane layout (the same losses and gradients)."""
    h, saved = to_lanes(x), []
    for router, bank in zip(step.routers, step.banks):
        picked, router_saved = lane_select_forward(router, h)
        out, bank_saved = lane_bank_forward(bank, picked.transpose(1, 2))  # [B, n, k, R] -> [B, n, 1, R]
        h = out[:, :, 0]
        saved.append((router_saved, bank_saved))
    picked, out_saved = lane_select_forward(step.output_router, h)
    logits = from_lanes(picked[:, :, 0]).contiguous()  # [R, B, outputs], laid out as on the bmm path
    losses, grad = loss_and_grad(logits, y)
    grad = to_lanes(grad)  # [B, outputs, R]
    grad = lane_select_backward(step.output_router, out_saved, grad.unsqueeze(2), need_input=True)
    for i in reversed(range(len(saved))):
        router_saved, bank_saved = saved[i]
        grad = lane_bank_backward(step.banks[i], bank_saved, grad.unsqueeze(2))  # [B, n, k, R]
        grad = lane_select_backward(step.routers[i], router_saved, grad.transpose(1, 2), need_input=i > 0)
    return losses


def lane_select_forward(router: Selector, h: torch.Tensor) -> tuple[torch.Tensor, tuple]:
    """`select_forward` on h [B, width, R]: the picked inputs [B, k, consumers, R]."""
    logits = router.logits
    mask = to_lanes(topk_mask(logits, router.k)[:, 0])  # [width, k, consumers, R]
    out = dot((h[:, w, None, None], mask[w]) for w in range(mask.shape[0]))
    s = torch.sigmoid(logits / router.tau if router.tau != 1 else logits) if logits.requires_grad else None
    return out, (h, mask, s)


def lane_select_backward(router: Selector, saved: tuple, grad: torch.Tensor, need_input: bool) -> torch.Tensor | None:
    """`select_backward` from grad [B, k, consumers, R]; the input's gradient [B, width, R]."""
    h, mask, s = saved
    W, k, n, R = mask.shape
    if s is not None:
        grad_mask = dot((h[b, :, None, None], grad[b]) for b in range(h.shape[0]))  # [W, k, n, R]
        grad_mask = from_lanes(grad_mask).contiguous().view(R, 1, W, k, n).sum(3)
        grad_logits = torch.ops.aten.sigmoid_backward(grad_mask, s)
        accumulate(router.logits, grad_logits / router.tau if router.tau != 1 else grad_logits)
    if not need_input:
        return None
    return dot((grad[:, j, c, None], mask[:, j, c]) for j in range(k) for c in range(n))


def lane_bank_forward(bank: Bank, x: torch.Tensor) -> tuple[torch.Tensor, tuple]:
    """`bank_forward` on x [B, n, in, R]: the outputs [B, n, out, R], inputs and activations kept."""
    inputs, activations, weights = [], [], []
    last = len(bank.weights) - 1
    for i, (w, b) in enumerate(zip(bank.weights, bank.biases)):
        w = to_lanes(w)  # [n, in, out, R]
        inputs.append(x)
        weights.append(w)
        x = dot((x[:, :, j, None], w[:, j]) for j in range(w.shape[1])).add_(to_lanes(b))
        if i < last:
            x = x.relu_()
            activations.append(x)
    return x, (inputs, activations, weights)


def lane_bank_backward(bank: Bank, saved: tuple, grad: torch.Tensor) -> torch.Tensor:
    """`bank_backward` from grad [B, n, out, R]; the input's gradient [B, n, in, R]."""
    inputs, activations, weights = saved
    for i in reversed(range(len(weights))):
        w, x = weights[i], inputs[i]
        if i < len(activations):
            grad = torch.ops.aten.threshold_backward(grad, activations[i], 0)
            old = grad.permute(3, 1, 0, 2).contiguous().transpose(1, 2)  # the bmm path's layout [R, B, n, out]
        else:
            old = from_lanes(grad).contiguous()
        accumulate(bank.biases[i], old.sum(1))
        accumulate(bank.weights[i], from_lanes(dot((x[b, :, :, None], grad[b, :, None]) for b in range(x.shape[0]))))
        grad = dot((grad[:, :, o, None], w[:, :, o]) for o in range(w.shape[2]))
    return grad
