"""A small CNN digit classifier: EVAR's quality yardstick for 16x16 digits.

It plays the role Inception plays for FID: its 128-d penultimate activations are the features
the Fréchet distance is measured in, and its predictions say whether a class-conditional
sample shows the requested digit.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm import tqdm

from evar.data import batches, load_digits

DEFAULT_PATH = Path(__file__).resolve().parent.parent / "assets" / "digits_classifier.safetensors"
IMAGE_SIZE = 16
NUM_CLASSES = 10
FEATURE_DIM = 128


class DigitClassifier(nn.Module):
    """(N, 3, 16, 16) in [-1, 1] -> 10 logits, through a 128-d feature layer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1)  # 16x16
        self.conv2 = nn.Conv2d(32, 64, 3, stride=2, padding=1)  # 8x8
        self.conv3 = nn.Conv2d(64, 64, 3, stride=2, padding=1)  # 4x4
        self.fc = nn.Linear(64 * 4 * 4, FEATURE_DIM)
        self.head = nn.Linear(FEATURE_DIM, NUM_CLASSES)

    def features(self, x: Tensor) -> Tensor:
        """(N, 3, 16, 16) -> (N, 128): the embedding Fréchet distances are computed in."""
        h = F.gelu(self.conv1(x))
        h = F.gelu(self.conv2(h))
        h = F.gelu(self.conv3(h))  # (N, 64, 4, 4)
        return F.gelu(self.fc(h.flatten(1)))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


@torch.no_grad()
def run_classifier(model: DigitClassifier, images: Tensor, batch_size: int = 512) -> tuple[Tensor, Tensor]:
    """Features (N, 128) and logits (N, 10) in one batched pass, on the CPU."""
    device = next(model.parameters()).device
    feats, logits = [], []
    for chunk in images.split(batch_size):
        f = model.features(chunk.to(device))
        feats.append(f.cpu())
        logits.append(model.head(f).cpu())
    return torch.cat(feats), torch.cat(logits)


def accuracy(model: DigitClassifier, images: Tensor, labels: Tensor) -> float:
    _, logits = run_classifier(model, images)
    return (logits.argmax(1) == labels).float().mean().item()


def augment(x: Tensor, generator: torch.Generator, noise_std: float = 0.05) -> Tensor:
    """Shift each image by up to one pixel each way, then add a little Gaussian noise.

    Generated digits are rarely centered exactly like the training set, and their pixels are
    never perfectly clean; the yardstick should not punish either.
    """
    n, _, h, w = x.shape
    # Pad with -1, the digits' background, so a shift brings in blank paper rather than a smear.
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)  # (N, 3, h+2, w+2)
    dy = torch.randint(0, 3, (n,), generator=generator)
    dx = torch.randint(0, 3, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, :, None]  # (N, h, 1)
    cols = (dx[:, None] + torch.arange(w))[:, None, :]  # (N, 1, w)
    shifted = padded.permute(0, 2, 3, 1)[torch.arange(n)[:, None, None], rows, cols]  # (N, h, w, 3)
    noise = torch.randn(shifted.shape, generator=generator) * noise_std
    return (shifted + noise).permute(0, 3, 1, 2).contiguous()


def save_classifier(model: DigitClassifier, out: Path, metadata: dict[str, str]) -> None:
    """Write the weights atomically: a crash never leaves a half-written asset behind."""
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    # Same directory as `out`, so os.replace is a rename within one filesystem, hence atomic.
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        save_file(state, tmp, metadata=metadata)
        os.chmod(tmp, 0o644)  # safetensors creates files as 0600; a shipped asset must be readable
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def train_classifier(
    seed: int = 0,
    epochs: int = 30,
    out: str | Path | None = DEFAULT_PATH,
    batch_size: int = 64,
    lr: float = 3e-3,
    weight_decay: float = 0.05,
    max_steps: int | None = None,
    progress: bool = True,
) -> dict:
    """Train on the digits 'train' split, evaluate on 'test', save to `out` (None: don't save).

    `max_steps` cuts training short (for smoke tests); the learning rate still follows the
    cosine schedule of the full run, so a cut run is simply an early snapshot of it.
    """
    start = time.perf_counter()
    images, labels = load_digits("train", IMAGE_SIZE)
    test_images, test_labels = load_digits("test", IMAGE_SIZE)
    with torch.random.fork_rng(devices=[]):  # seed the init without disturbing the caller's RNG
        torch.manual_seed(seed)
        model = DigitClassifier()
    generator = torch.Generator().manual_seed(seed)

    steps_per_epoch = -(-len(images) // batch_size)
    total = epochs * steps_per_epoch
    steps = total if max_steps is None else min(total, max_steps)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    stream = batches(images, labels, batch_size, generator)

    model.train()
    bar = tqdm(range(steps), desc="digits classifier", disable=not progress)
    for _ in bar:
        x, y = next(stream)
        loss = F.cross_entropy(model(augment(x, generator)), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    model.eval()

    test_accuracy = accuracy(model, test_images, test_labels)
    seconds = time.perf_counter() - start
    result = {"test_accuracy": test_accuracy, "epochs": epochs, "steps": steps, "seconds": seconds}
    if out is not None:
        recipe = (
            f"evar.eval.classifier.train_classifier(seed={seed}, epochs={epochs}, batch_size={batch_size}, "
            f"lr={lr}, weight_decay={weight_decay}, max_steps={max_steps})"
        )
        metadata = {
            "recipe": recipe,
            "test_accuracy": f"{test_accuracy:.6f}",
            "train_seconds": f"{seconds:.1f}",
            "torch_version": torch.__version__,
            "data": "sklearn digits, 'train' split of evar.data.load_digits (size 16)",
        }
        save_classifier(model, Path(out), metadata)
    return result


def load_classifier(path: str | Path | None = None) -> DigitClassifier:
    """The shipped (or given) classifier weights, in eval mode."""
    path = DEFAULT_PATH if path is None else Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"classifier weights not found: {path} (make them with evar.eval.classifier.train_classifier)"
        )
    model = DigitClassifier()
    model.load_state_dict(load_file(str(path)))
    return model.eval()
