"""Dense and hierarchically modular networks (spec §3), every parameter stacked over replicates.

All models map inputs [R, B, ...] and task ids [R, B] to output logits [R, B, n_outputs]:
R replicates (independent networks, one seed each) run as one batched model, and the
modules of a layer run as one batched tensor op on weights stacked [R, modules, in, out].
Replicate r draws all its parameters from its own generator, in the same order as a
single run would, so replicate r of an R-replicate model *is* the model of seed + r.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from modnets.circuits import Circuit, joint_library
from modnets.config import ConfigError, check
from modnets.routers import InputRouter, LocationRouter, Routed, Router


def stacked(generators: list[torch.Generator], draw) -> torch.Tensor:
    """draw(generator) for each replicate, stacked on a leading replicate dimension."""
    return torch.stack([draw(g) for g in generators])


def uniform(shape, bound: float):
    return lambda g: torch.empty(shape).uniform_(-bound, bound, generator=g)


class ModuleBank(nn.Module):
    """`n` MLPs with widths `arch` (Linear+ReLU, linear output); weights [R, n, in, out].

    Initialised like torch.nn.Linear: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases.
    """

    def __init__(self, generators, n: int, arch: list[int]):
        super().__init__()
        self.arch = list(arch)
        self.weights, self.biases = nn.ParameterList(), nn.ParameterList()
        for fan_in, fan_out in zip(arch[:-1], arch[1:]):
            bound = 1 / math.sqrt(fan_in)
            self.weights.append(nn.Parameter(stacked(generators, uniform((n, fan_in, fan_out), bound))))
            self.biases.append(nn.Parameter(stacked(generators, uniform((n, fan_out), bound))))

    def forward(self, x: torch.Tensor, masks=None) -> torch.Tensor:
        """Module i on its own input: x [R, B, n, in] -> [R, B, n, out].

        Each layer is one bmm over the R * n modules, the bmm einsum("rbni,rnio->rbno") runs,
        without einsum's planning: the same numbers with fewer ops forward and backward."""
        if not torch.is_grad_enabled():
            return self.evaluate(x, masks)
        R, B, n, _ = x.shape
        last = len(self.arch) - 2
        for i, (w, b) in enumerate(zip(self.weights._parameters.values(), self.biases._parameters.values())):
            if masks is not None:
                w = w * masks[i]
            h = torch.bmm(x.transpose(1, 2).reshape(R * n, B, -1), w.reshape(R * n, *w.shape[2:]))
            x = h.view(R, n, B, -1).transpose(1, 2) + b.unsqueeze(1)
            if i < last:
                x = torch.relu(x)
        return x

    def evaluate(self, x: torch.Tensor, masks=None) -> torch.Tensor:
        """`forward` without autograd (evaluation): the same bmm on the same inputs, the bias and ReLU
        on its output in its own layout [R, n, B, out] (contiguous: no copy before the next layer's
        bmm), so the same numbers at a fraction of the elementwise cost with many replicates. Not
        under autograd: there the layout would change the order of the bias gradient's sum."""
        R, B, n, _ = x.shape
        last = len(self.arch) - 2
        x = x.transpose(1, 2).reshape(R * n, B, -1)
        for i, (w, b) in enumerate(zip(self.weights._parameters.values(), self.biases._parameters.values())):
            if masks is not None:
                w = w * masks[i]
            x = torch.bmm(x, w.reshape(R * n, *w.shape[2:])).view(R, n, B, -1).add_(b.unsqueeze(2))
            if i < last:
                x.relu_()
            x = x.view(R * n, B, -1)
        return x.view(R, n, B, -1).transpose(1, 2)

    def every_module(self, x: torch.Tensor) -> torch.Tensor:
        """Every module on every slot's input: x [R, B, slots, in] -> [R, B, slots, n, out]."""
        x = x.unsqueeze(3)
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            x = torch.einsum("rbsni,rnio->rbsno", x, w) + b[:, None, None]
            if i < last:
                x = torch.relu(x)
        return x

    @torch.no_grad()
    def normalise(self, x: torch.Tensor, masks=None) -> torch.Tensor:
        """LSUV on inputs x [R, B, n, in]: scale each layer so that every hidden pre-activation has
        variance 1 over the B rows and shift the output layer to mean 0; returns the new outputs."""
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            z = torch.einsum("rbni,rnio->rbno", x, w * masks[i] if masks is not None else w) + b.unsqueeze(1)
            std = z.std(1).clamp_min(1e-3)  # [R, n, out]
            w /= std.unsqueeze(2)
            b /= std
            if i == last:
                b -= (z.mean(1) / std)
            x = z / std.unsqueeze(1) - (z.mean(1, keepdim=True) / std.unsqueeze(1) if i == last else 0)
            if i < last:
                x = torch.relu(x)
        return x


def candidates(apply, routed: Routed) -> torch.Tensor:
    """Consumers on their routed inputs: apply(x [R, B', n, k]) -> [R, B', n] on every candidate
    input set, outputs summed with the candidate weights (one hard or mixed set: applied once)."""
    x, weights = routed
    if weights is None:
        return apply(x[:, :, 0])
    R, B, C = x.shape[:3]
    out = apply(x.reshape(R, B * C, *x.shape[3:])).view(R, B, C, -1)
    return (out * weights).sum(2)


class MLP(nn.Module):
    """Dense baseline: Linear+ReLU layers and a linear head, with an optional fixed random
    pruning mask removing `prune_percent` percent of all weights. Multi-task inputs carry
    the task id as a one-hot vector. `init`: `torch` (default) or `lsuv` (as `ModularNet`)."""

    def __init__(self, task, routing: Router | None, generators, hidden=(36, 36, 36), prune_percent=0.0, init="torch"):
        super().__init__()
        check(routing is None or not routing.known, "router", "known", "router=learned: a dense model has no routing to fix")
        self.n_tasks = task.n_tasks
        n_in = math.prod(task.x.shape[1:]) + (self.n_tasks if self.n_tasks > 1 else 0)  # images: all pixels
        check(0 <= prune_percent < 100, "model.prune_percent", prune_percent, "a percentage in [0, 100)")
        check(all(int(h) > 0 for h in hidden), "model.hidden", list(hidden), "positive layer widths")
        self.net = ModuleBank(generators, 1, [n_in, *map(int, hidden), task.n_outputs])
        masks = None
        if prune_percent > 0:
            shapes = [w.shape[1:] for w in self.net.weights]
            masks = [[] for _ in shapes]
            for g in generators:  # scores uniform at random, threshold at the p-th percentile
                scores = [torch.rand(s, generator=g) for s in shapes]
                cut = torch.quantile(torch.cat([s.flatten() for s in scores]), prune_percent / 100)
                for m, s in zip(masks, scores):
                    m.append((s > cut).float())
            masks = [torch.stack(m) for m in masks]
        self.masks = masks
        for i, m in enumerate(masks or []):
            self.register_buffer(f"mask{i}", m)
        check(init in ("torch", "lsuv"), "model.init", init, "torch or lsuv")
        if init == "lsuv" and not self.net.weights[0].is_meta:
            rows = task.splits["train"]
            x, R = task.x[rows], len(generators)
            self.net.normalise(self.inputs(x.expand(R, *x.shape), task.task_id[rows].expand(R, -1)), self.masks)

    def inputs(self, x, task_id):
        """The network's input [R, B, 1, features]: flattened, with the task id one-hot when several."""
        x = x.flatten(2)
        if self.n_tasks > 1:
            x = torch.cat([x, nn.functional.one_hot(task_id, self.n_tasks).to(x.dtype)], dim=2)
        return x.unsqueeze(2)

    def forward(self, x, task_id, noise=None):
        masks = [getattr(self, f"mask{i}") for i in range(len(self.net.weights))] if self.masks else None
        return self.net(self.inputs(x, task_id), masks).squeeze(2)

    def routing_summary(self) -> list[dict]:
        return [{} for _ in range(self.net.weights[0].shape[0])]


class ModularNet(nn.Module):
    """Hierarchically modular network: per layer, routed modules of arity `routing.topk`.

    `shared=False`: one module per slot. `shared=True`: a library of `library_size` modules
    shared by all layers, each slot picking one through a location router. Layer widths
    (`num_modules`) default to the task's structure, every layer but the last `widen` times
    wider (spare modules: more chances that some module finds each true input set, the
    routers above pick the ones they need); an output router picks the task's output
    bits from the last layer (or from all layers with `skip_output`). `init`: `torch` (the
    original, torch.nn.Linear's uniform init) or `lsuv` (signal-preserving, see `lsuv`).
    Routers come from the router method (`routing`); the model never names a router class.
    """

    def __init__(
        self,
        task,
        routing: Router,
        generators,
        num_modules=None,
        hidden=(12,),
        shared=False,
        library_size=None,
        skip_output=False,
        init="torch",
        widen=1,
    ):
        super().__init__()
        T, k = task.n_tasks, int(routing.topk)
        image_task = len(getattr(task, "x", torch.empty(0, 0)).shape) > 2  # the circuit of an ImageModularNet has no x
        check(not image_task, "model", "ModularNet", "model=image_modular or image_shared for an image task")
        circuits: list[Circuit] | None = task.circuits
        if num_modules is None:
            check(circuits is not None, "model.num_modules", None, "explicit widths: this task has no modular structure")
            check(widen == 1 or not routing.known, "model.widen", widen, "1 under known routing (the task's widths)")
            num_modules = [int(n) * int(widen) for n in task.modularity[1:-2]] + task.modularity[-2:-1]
        num_modules = [int(n) for n in num_modules]
        check(len(num_modules) > 0 and min(num_modules) > 0, "model.num_modules", num_modules, "positive widths")
        if routing.known:
            check(circuits is not None, "router", "known", "a task with known structure (not an unstructured table)")
            truth = task.modularity[1:-1]
            allowed = f"{truth} to match the task's modularity {task.modularity} under known routing"
            check(num_modules == truth, "model.num_modules", num_modules, allowed)
            arities = {c.arity for c in circuits}
            allowed = f"{min(arities)}, the arity of the task's gates, under known routing"
            check(arities == {k}, "router.topk", k, allowed if len(arities) == 1 else "learned routing: mixed gate arities")
            per_slot = [{c.layers[i][j].op for c in circuits if j < len(c.layers[i])}
                        for i, n in enumerate(truth) for j in range(n)]
            allowed = "model=shared: under known routing one module per slot cannot compute another gate in each task"
            check(shared or not routing.known_inputs or all(len(ops) == 1 for ops in per_slot), "model.shared", shared, allowed)
        widths = [task.n_inputs, *num_modules]
        for i, w in enumerate(widths[:-1]):
            check(k <= w, "router.topk", k, f"at most {w}, the width of the layer that layer {i + 1} reads")
        read_by_output = sum(num_modules) if skip_output else num_modules[-1]
        allowed = f"a last layer of at least {task.n_outputs} modules (one per output bit)"
        check(task.n_outputs <= read_by_output, "model.num_modules", num_modules, allowed)

        def router(width, consumers, arity, truth, sets=True):
            return routing.input_router(generators, (T, width, consumers), arity, truth=truth, sets=sets)

        self.shared, self.skip_output = bool(shared), bool(skip_output)
        arch = [k, *map(int, hidden), 1]
        if self.shared:
            library, slots = joint_library(circuits) if circuits else ([], None)  # one library for all tasks
            library_size = int(library_size or len(library))
            check(library_size > 0, "model.library_size", library_size, "a positive number of shared modules")
            if routing.known_locations:
                allowed = f"at least {len(library)}, the task's distinct gates, under known locations"
                check(library_size >= len(library), "model.library_size", library_size, allowed)
            self.bank = ModuleBank(generators, library_size, arch)
            self.locations = nn.ModuleList()
        else:
            self.banks = nn.ModuleList()
        self.routers = nn.ModuleList()
        for i, (w, n) in enumerate(zip(widths[:-1], widths[1:])):
            truth = [c.routing[i] for c in circuits] if routing.known_inputs else None
            self.routers.append(router(w, n, k, truth))
            if self.shared:
                truth = [s[i] for s in slots] if routing.known_locations else None
                self.locations.append(routing.location_router(generators, (T, library_size, n), truth=truth))
            else:
                self.banks.append(ModuleBank(generators, n, arch))
        offset = sum(num_modules[:-1]) if skip_output else 0
        truth = [[[offset + o for o in c.outputs]] for c in circuits] if routing.known_outputs else None
        self.output_router = router(read_by_output, 1, task.n_outputs, truth, sets=False)
        self.noise_per_sample = routing.per_sample
        self.routing = routing  # the router method: the trainer calls its schedule and loss
        check(init in ("torch", "lsuv"), "model.init", init, "torch or lsuv")
        check(init == "torch" or not self.shared, "model.init", init, "torch for shared modules (lsuv: shared=false)")
        if init == "lsuv" and not self.routers[0].logits.is_meta:
            self.lsuv(task)

    def layers(self, x, task_id, noise=None) -> list[torch.Tensor]:
        """The outputs [R, B, n] of every module layer."""
        noise = noise or {}
        h, outputs = x, []
        for i, router in enumerate(self.routers):
            routed = router(h, task_id, noise.get(f"routers.{i}"))
            if self.shared:
                scores = self.locations[i](task_id, noise.get(f"locations.{i}"))  # [R, B|1, library, n]
                h = candidates(lambda x, s=scores: self.mix(x, s), routed)
            else:
                h = candidates(lambda x, bank=self.banks[i]: bank(x).squeeze(-1), routed)
            outputs.append(h)
        return outputs

    def mix(self, x: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """Shared library on slot inputs x [R, B', slots, k], weighted by module scores
        [R, B|1, library, slots] (B' = B x candidates: each sample's scores serve all its candidates)."""
        if scores.shape[1] not in (1, x.shape[1]):
            scores = scores.repeat_interleave(x.shape[1] // scores.shape[1], 1)
        return torch.einsum("rbnl,rbln->rbn", self.bank.every_module(x).squeeze(-1), scores)

    def forward(self, x, task_id, noise=None):
        outputs = self.layers(x, task_id, noise)
        h = torch.cat(outputs, dim=2) if self.skip_output else outputs[-1]
        return self.output_router(h, task_id, (noise or {}).get("output_router")).x[:, :, 0, 0, :]

    @torch.no_grad()
    def lsuv(self, task) -> None:
        """Data-dependent init (Mishkin & Matas, "All you need is a good init", ICLR 2016), layer by
        layer on the training rows with the initial hard routing: every hidden unit's
        pre-activation gets variance 1 and every module's output mean 0 and variance 1 over those
        rows, so the signal reaching the output does not shrink (or grow) with depth."""
        rows = task.splits["train"]
        R = self.routers[0].logits.shape[0]
        h, tid = task.x[rows].expand(R, -1, -1), task.task_id[rows].expand(R, -1)
        was = self.training
        self.eval()
        for router, bank in zip(self.routers, self.banks):
            h = bank.normalise(router(h, tid).x[:, :, 0]).squeeze(-1)
        self.train(was)

    def routing_summary(self) -> list[dict]:
        """Per replicate, the noise-free routing: input indices per layer, output picks, locations."""
        layers = [r.selection().tolist() for r in self.routers]
        out = self.output_router.selection().tolist()
        locs = [m.selection().tolist() for m in self.locations] if self.shared else None
        summary = []
        for r in range(len(out)):
            s = {"inputs": [layer[r] for layer in layers], "outputs": [t[0] for t in out[r]]}
            if locs is not None:
                s["locations"] = [layer[r] for layer in locs]
            summary.append(s)
        return summary


def router_kinds(model: nn.Module) -> dict:
    """Router logits (at any depth of the model) -> `input_routers` or `location_routers`."""
    kinds = {}
    for m in model.modules():
        if isinstance(m, (InputRouter, LocationRouter)):
            kinds[m.logits] = "location_routers" if isinstance(m, LocationRouter) else "input_routers"
    return kinds


def parameter_groups(model: nn.Module, routing: Router | None, lr: float) -> list[dict]:
    """Trainable parameters in three groups with their own learning rates: module weights (`lr`),
    input/output routers (`router.lr`) and location routers (`router.location_lr`)."""
    groups = {"modules": [], "input_routers": [], "location_routers": []}
    kind = router_kinds(model)
    for p in model.parameters():
        if p.requires_grad:
            groups[kind.get(p, "modules")].append(p)
    lrs = {"modules": lr}
    if routing is not None:
        lrs |= {"input_routers": routing.lr, "location_routers": routing.location_lr}
    return [{"params": ps, "lr": lrs[k], "name": k} for k, ps in groups.items() if ps]


def count_parameters(model: nn.Module, replicates: int) -> dict[str, int]:
    """Parameter counts of one replicate: total, trainable, and router logits."""
    def n(ps):
        return sum(p.numel() for p in ps) // replicates

    named = list(model.named_parameters())
    return {
        "total": n(p for _, p in named),
        "trainable": n(p for _, p in named if p.requires_grad),
        "routers": n(router_kinds(model)),
    }


class FlopCount(TorchDispatchMode):
    """torch's FlopCounterMode total (its per-op formulas, its decompositions) without its module
    tracking, which imports torch's compiler stack (seconds) on first use."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:  # nothing here is compiled: do not wrap (and import) torch._dynamo
        return False

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in flop_registry and func is not torch.ops.prim.device.default:
            with self:
                out = func.decompose(*args, **kwargs)
                if out is not NotImplemented:
                    return out
        out = func(*args, **kwargs)
        if func._overloadpacket in flop_registry:
            self.total += flop_registry[func._overloadpacket](*args, **kwargs, out_val=out)
        return out


def count_flops(model: nn.Module, task, replicates: int, samples: int, batch: int = 64) -> dict[str, float]:
    """Training FLOPs of one replicate, as implemented: the matmul/conv FLOPs that torch's
    FlopCounterMode sees in one forward and one backward pass on up to `batch` training rows,
    per sample, times `samples` (the training samples seen: epochs x training rows).
    Elementwise ops and evaluation passes are not counted. Leaves no gradients behind."""
    rows = task.splits["train"][:batch]
    x, tid = task.x[rows], task.task_id[rows]
    n = replicates * len(rows)
    with FlopCount() as forward:
        out = model(x.expand(replicates, *x.shape), tid.expand(replicates, -1))
    with FlopCount() as backward:
        if out.requires_grad:
            out.sum().backward()
    model.zero_grad(set_to_none=True)
    f, b = forward.total / n, backward.total / n
    return {"forward_per_sample": f, "train_per_sample": f + b, "train": (f + b) * samples}


__all__ = ["MLP", "ModularNet", "ModuleBank", "ConfigError", "parameter_groups", "count_parameters", "count_flops"]
