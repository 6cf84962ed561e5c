"""Models for image tasks (spec §5): a CNN baseline and modular nets whose first layer are image modules.

Inputs are images x [R, B, images, H, W]. The flat MLP baseline is `models.MLP` (it flattens
its input). `CNN` reads the images as channels. `ImageModularNet` is the `[2, 2, 3, 2, 2]`
network of spec §5: each image module (an MLP or a small CNN) reads ONE image, chosen by a
top-1 input router, and emits a 3-value code; the codes of all modules, concatenated, feed a
`models.ModularNet` (the Boolean circuit layers). With `shared=True` the image modules and the
circuit modules each come from their own library, slots choosing modules by location routers.
As in `models`, every parameter has a leading replicate dimension drawn per replicate.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from modnets.config import check
from modnets.models import ModularNet, ModuleBank, stacked, uniform
from modnets.routers import Router


class ConvBank(nn.Module):
    """`n` small CNNs run as one grouped convolution: per entry of `channels`, a 3x3 convolution
    (padding 1), ReLU and 2x2 max-pooling; then an MLP head `[features, *hidden, out]`.
    Initialised like torch's Conv2d/Linear: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""

    def __init__(self, generators, n: int, in_channels: int, image_shape, channels=(8, 16), hidden=(64,), out=3):
        super().__init__()
        check(all(int(c) > 0 for c in channels), "model.channels", list(channels), "positive channel counts")
        self.n, self.in_channels = n, in_channels
        self.weights, self.biases = nn.ParameterList(), nn.ParameterList()
        c_in, (h, w) = in_channels, image_shape
        for c in map(int, channels):
            bound = 1 / math.sqrt(c_in * 9)
            self.weights.append(nn.Parameter(stacked(generators, uniform((n, c, c_in, 3, 3), bound))))
            self.biases.append(nn.Parameter(stacked(generators, uniform((n, c), bound))))
            c_in, h, w = c, h // 2, w // 2
        allowed = f"at most {len(channels) - 1} pooling layers for {list(image_shape)} images"
        check(h > 0 and w > 0, "model.channels", list(channels), allowed)
        self.head = ModuleBank(generators, n, [c_in * h * w, *map(int, hidden), out])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Module i on its own image(s): x [R, B, n, C, H, W] -> [R, B, n, out]."""
        R, B, n = x.shape[:3]
        h = x.transpose(0, 1).reshape(B, R * n * self.in_channels, *x.shape[-2:])  # groups = (replicate, module)
        for w, b in zip(self.weights, self.biases):
            h = F.conv2d(h, w.flatten(0, 2), b.flatten(), padding=1, groups=R * n)
            h = F.max_pool2d(F.relu(h), 2)
        return self.head(h.view(B, R, n, -1).transpose(0, 1))

    def every_module(self, x: torch.Tensor) -> torch.Tensor:
        """Every module on every slot's image: x [R, B, slots, C, H, W] -> [R, B, slots, n, out]."""
        R, B, S = x.shape[:3]
        x = x.unsqueeze(3).expand(R, B, S, self.n, *x.shape[3:]).reshape(R, B * S, self.n, *x.shape[3:])
        return self.forward(x).view(R, B, S, self.n, -1)


class CNN(nn.Module):
    """CNN baseline (spec §5): the images of a row as channels, conv + pool layers, an MLP head."""

    def __init__(self, task, routing: Router | None, generators, channels=(16, 32), hidden=(128,)):
        super().__init__()
        check(len(task.x.shape) == 4, "model", "cnn", "an image task (task=digits or task=mnist)")
        check(not routing.known, "router", "known", "router=learned: a dense model has no routing to fix")
        check(task.n_tasks == 1, "model", "cnn", "a single-task dataset")
        self.net = ConvBank(generators, 1, task.x.shape[1], task.x.shape[2:], channels, hidden, task.n_outputs)

    def forward(self, x, task_id, noise=None):
        return self.net(x.unsqueeze(2)).squeeze(2)

    def routing_summary(self) -> list[dict]:
        return [{} for _ in range(self.net.weights[0].shape[0])]


class ImageModularNet(nn.Module):
    """Image modules routed to one image each, then the Boolean circuit layers (`ModularNet`).

    `image_slots` image modules (default: one per image) each emit `code_bits` values; the circuit
    reads their concatenation (slot 0's code first). `image_module`: `mlp` (hidden widths
    `image_hidden`) or `cnn` (`image_channels`, then `image_hidden`). Known routing
    (`router=known`): slot i reads image i, and with `shared=True` every slot uses image module 0.
    """

    def __init__(
        self,
        task,
        routing: Router,
        generators,
        image_module="mlp",
        image_hidden=(128, 64),
        image_channels=(8, 16),
        image_slots=None,
        image_library_size=None,
        code_bits=3,
        num_modules=None,
        hidden=(12,),
        shared=False,
        library_size=None,
        skip_output=False,
    ):
        super().__init__()
        check(len(task.x.shape) == 4, "model", "image_modular", "an image task (task=digits or task=mnist)")
        T, n_images = task.n_tasks, task.x.shape[1]
        slots = int(image_slots or n_images)
        check(slots > 0, "model.image_slots", image_slots, "a positive number of image modules")
        check(int(code_bits) > 0, "model.code_bits", code_bits, "a positive code width")
        if routing.known_inputs:
            check(slots == n_images, "model.image_slots", image_slots, f"{n_images}, one per image, under known routing")
            truth = task.circuits[0].n_inputs
            check(slots * int(code_bits) == truth, "model.code_bits", code_bits, f"{truth // slots} under known routing")
        check(image_module in ("mlp", "cnn"), "model.image_module", image_module, "mlp or cnn")
        self.shared, self.image_module = bool(shared), image_module

        truth = [[[s] for s in range(slots)]] * T if routing.known_inputs else None
        self.image_router = routing.input_router(generators, (T, n_images, slots), 1, truth=truth)
        n_modules = slots
        if self.shared:
            n_modules = int(image_library_size or 1)
            check(n_modules > 0, "model.image_library_size", image_library_size, "a positive number of image modules")
            truth = [[0] * slots] * T if routing.known_locations else None
            self.image_locations = routing.location_router(generators, (T, n_modules, slots), truth=truth)
        if image_module == "mlp":
            size = math.prod(task.x.shape[2:])
            self.image_bank = ModuleBank(generators, n_modules, [size, *map(int, image_hidden), int(code_bits)])
        else:
            self.image_bank = ConvBank(generators, n_modules, 1, task.x.shape[2:], image_channels, image_hidden, int(code_bits))
        codes = SimpleNamespace(  # what the circuit layers see: a task over the concatenated codes
            n_inputs=slots * int(code_bits), n_outputs=task.n_outputs, n_tasks=T, circuits=task.circuits,
            modularity=task.modularity,
        )
        self.circuit = ModularNet(codes, routing, generators, num_modules, hidden, shared, library_size, skip_output)
        self.noise_per_sample = routing.per_sample
        self.routing = routing

    def select_images(self, x, task_id, noise):
        """The image each slot reads: x [R, B, images, H, W] -> [R, B, slots, H, W].

        The router applied to the one-hot rows of an identity matrix returns its own selection
        matrix (hard in value, straight-through gradients), one per sample when needed."""
        R, B, n = x.shape[:3]
        per_sample = self.image_router.logits.shape[1] > 1 or (noise is not None and noise.shape[1] > 1)
        rows = B if per_sample else 1
        eye = torch.eye(n, device=x.device).repeat(rows, 1).expand(R, -1, -1)  # [R, rows * n, n]
        tid = task_id[:, :rows].repeat_interleave(n, 1)
        noise = noise.repeat_interleave(n, 1) if noise is not None and per_sample else noise
        picks = self.image_router(eye, tid, noise).x[:, :, 0].reshape(R, rows, n, -1)  # [R, rows, images, slots]
        picks = picks.expand(R, B, -1, -1)
        log_prob = getattr(self.image_router, "log_prob", None)  # a sampling router saw each sample n times
        if log_prob is not None and log_prob.shape[1] == rows * n:
            self.image_router.log_prob = log_prob.view(R, rows, n)[:, :, 0]
        return torch.einsum("rbnd,rbns->rbsd", x.flatten(3), picks).view(R, B, -1, *x.shape[3:])

    def encode(self, images, task_id, noise):
        """Codes [R, B, slots, code_bits] of the selected images [R, B, slots, H, W]."""
        images = images.flatten(3) if self.image_module == "mlp" else images.unsqueeze(3)
        if not self.shared:
            return self.image_bank(images)
        scores = self.image_locations(task_id, noise)  # [R, B|1, library, slots]
        return torch.einsum("rbslo,rbls->rbso", self.image_bank.every_module(images), scores)

    def forward(self, x, task_id, noise=None):
        noise = noise or {}
        images = self.select_images(x, task_id, noise.get("image_router"))
        codes = self.encode(images, task_id, noise.get("image_locations")).flatten(2)
        inner = {k.removeprefix("circuit."): v for k, v in noise.items() if k.startswith("circuit.")}
        return self.circuit(codes, task_id, inner)

    def routing_summary(self) -> list[dict]:
        """The circuit's routing per replicate, plus `images[task][slot]` = the image each image
        module reads and, shared, `image_locations[task][slot]` = its library module."""
        summary = self.circuit.routing_summary()
        images = self.image_router.selection()[..., 0].tolist()  # [R, T, slots]
        locations = self.image_locations.selection().tolist() if self.shared else None
        for r, s in enumerate(summary):
            s["images"] = images[r]
            if locations is not None:
                s["image_locations"] = locations[r]
        return summary
