"""Training and evaluation samples over a `cocolvis build` directory.

Training draws from an endless stream of epochs, each a permutation of the images
seeded by (seed, epoch); the augmentation of the sample at stream position p is
seeded by (seed, p). A batch is therefore a function of (seed, iteration) alone,
whatever the number of loader workers or torchrun processes (each loads its slice),
which is what makes resuming exact.
"""
from __future__ import annotations

import cv2
import numpy as np
import torch

from cocolvis.dataset import BuiltDataset
from segkit.io import InputError
from segkit.signals import ignore_stop_signals

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
# The padding colour: the ImageNet mean, 0 once normalised.
PAD_RGB = tuple(int(round(m * 255)) for m in MEAN)


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """RGB uint8 (H, W, 3) -> float (3, H, W), ImageNet mean/std normalised."""
    # contiguous(): a permuted HWC view would make every convolution run channels-last,
    # several times slower on CPU.
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).contiguous().float().div_(255.0)
    mean = torch.tensor(MEAN).view(3, 1, 1)
    std = torch.tensor(STD).view(3, 1, 1)
    return x.sub_(mean).div_(std)


class SampleError(InputError):
    """An InputError raised while loading a sample; survives the trip out of a DataLoader worker.

    PyTorch re-raises a worker's exception as `type(e)(text)` with the worker's traceback
    in the text: keep only the original one-line message.
    """

    def __init__(self, message: str):
        if message.startswith("Caught "):
            prefix = f"{type(self).__module__}.{type(self).__name__}: "
            lines = [line for line in message.splitlines() if line.startswith(prefix)]
            message = lines[-1][len(prefix):] if lines else message.strip().splitlines()[-1]
        super().__init__(None, message)

    def __reduce__(self):
        return type(self), (self.message,)


def load_pair(dataset: BuiltDataset, record: dict) -> tuple[np.ndarray, np.ndarray]:
    """The RGB image and uint16 mask of one record, checked against each other."""
    try:
        image = dataset.read_image(record)
        mask = dataset.read_mask(record["id"])
    except InputError as e:
        raise SampleError(e.message) from None
    if image.shape[:2] != mask.shape:
        raise SampleError(f"{dataset.mask_path(record['id'])}: mask is {mask.shape[1]}x{mask.shape[0]} "
                          f"but image {record['file']} is {image.shape[1]}x{image.shape[0]}")
    return image, mask


def augment(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, crop: int,
            scale: tuple[float, float] = (0.5, 2.0), flip: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Random scale, random crop (padding labelled unlabeled) and horizontal flip."""
    s = rng.uniform(scale[0], scale[1])
    h, w = mask.shape
    size = (max(1, int(round(w * s))), max(1, int(round(h * s))))
    image = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
    mask = cv2.resize(mask, size, interpolation=cv2.INTER_NEAREST)
    h, w = mask.shape
    ph, pw = max(crop - h, 0), max(crop - w, 0)
    if ph or pw:
        image = cv2.copyMakeBorder(image, 0, ph, 0, pw, cv2.BORDER_CONSTANT, value=PAD_RGB)
        mask = cv2.copyMakeBorder(mask, 0, ph, 0, pw, cv2.BORDER_CONSTANT, value=0)
        h, w = mask.shape
    y = int(rng.integers(0, h - crop + 1))
    x = int(rng.integers(0, w - crop + 1))
    image, mask = image[y:y + crop, x:x + crop], mask[y:y + crop, x:x + crop]
    if flip and rng.random() < 0.5:
        image, mask = image[:, ::-1], mask[:, ::-1]
    return np.ascontiguousarray(image), np.ascontiguousarray(mask)


def center_crop(image: np.ndarray, mask: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Resize the short side to `size`, then take the central size x size square."""
    h, w = mask.shape
    s = size / min(h, w)
    new = (max(size, int(round(w * s))), max(size, int(round(h * s))))
    image = cv2.resize(image, new, interpolation=cv2.INTER_LINEAR)
    mask = cv2.resize(mask, new, interpolation=cv2.INTER_NEAREST)
    y, x = (new[1] - size) // 2, (new[0] - size) // 2
    return image[y:y + size, x:x + size], mask[y:y + size, x:x + size]


class TrainSamples(torch.utils.data.Dataset):
    """Augmented crops, indexed by position in the endless shuffled stream of images."""

    def __init__(self, dataset: BuiltDataset, crop: int, scale: tuple[float, float] = (0.5, 2.0),
                 flip: bool = True, seed: int = 0):
        if not dataset.images:
            raise InputError(dataset.root / "images.jsonl", "no images to train on")
        self.dataset, self.crop, self.scale, self.flip, self.seed = dataset, crop, tuple(scale), flip, seed
        self._order: tuple[int, np.ndarray | None] = (-1, None)

    def __len__(self) -> int:
        return len(self.dataset.images)

    def order(self, epoch: int) -> np.ndarray:
        """The image order of one epoch, a permutation seeded by (seed, epoch)."""
        if self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng([self.seed, 0, epoch]).permutation(len(self)))
        return self._order[1]

    def __getitem__(self, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, offset = divmod(int(position), len(self))
        record = self.dataset.images[self.order(epoch)[offset]]
        image, mask = load_pair(self.dataset, record)
        rng = np.random.default_rng([self.seed, 1, int(position)])
        image, mask = augment(image, mask, rng, self.crop, self.scale, self.flip)
        return to_tensor(image), torch.from_numpy(mask.astype(np.int64))


class EvalSamples(torch.utils.data.Dataset):
    """Whole images (or resized centre crops), in file order, with their ids."""

    def __init__(self, dataset: BuiltDataset, crop: int | None = None):
        self.dataset, self.crop = dataset, crop

    def __len__(self) -> int:
        return len(self.dataset.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        record = self.dataset.images[index]
        image, mask = load_pair(self.dataset, record)
        if self.crop:
            image, mask = center_crop(image, mask, self.crop)
        return to_tensor(image), torch.from_numpy(mask.astype(np.int64)), int(record["id"])


class BatchShare(torch.utils.data.Sampler):
    """Stream positions of one rank's share of iterations start..stop-1.

    Iteration i's global batch is positions i*B..(i+1)*B-1 whatever the number of ranks;
    rank r of W takes its r-th slice of B/W positions (all of them when W is 1).
    """

    def __init__(self, batch: int, start: int, stop: int, rank: int = 0, world: int = 1):
        if batch % world or not 0 <= rank < world:
            raise ValueError(f"a batch of {batch} cannot be shared by rank {rank} of {world}")
        self.batch, self.share, self.rank, self.start, self.stop = batch, batch // world, rank, start, stop

    def __len__(self) -> int:
        return (self.stop - self.start) * self.share

    def __iter__(self):
        for i in range(self.start, self.stop):
            first = i * self.batch + self.rank * self.share
            yield from range(first, first + self.share)


def train_loader(samples: TrainSamples, batch: int, start_iter: int, stop_iter: int, workers: int = 0,
                 pin_memory: bool = False, rank: int = 0, world: int = 1) -> torch.utils.data.DataLoader:
    """This rank's part of the batches of iterations start_iter..stop_iter-1 (see BatchShare): global batch `batch`."""
    positions = BatchShare(batch, start_iter, stop_iter, rank, world)
    return torch.utils.data.DataLoader(samples, batch_size=positions.share, sampler=positions, num_workers=workers,
                                       pin_memory=pin_memory, drop_last=False,
                                       persistent_workers=False, worker_init_fn=ignore_stop_signals)
