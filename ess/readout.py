"""How far the class side of a trained ESS network lags its pixel side: the same network read out with each
class embedding replaced by the mean embedding of its training pixels (`ess eval --readout pixel-mean`).

If the network's pixel embeddings separate the classes but the learned class embeddings sit away from them,
this readout scores far above the learned one; the gap between the two is the class side's lag.
"""
from __future__ import annotations

import copy

import torch
from tqdm import tqdm

from cocolvis.dataset import BuiltDataset
from ess import distributed
from ess.data import EvalSamples
from ess.heads import EssHead
from ess.model import Segmenter
from segkit.errors import InputError


@torch.no_grad()
def pixel_means(model: Segmenter, dataset: BuiltDataset, device: torch.device,
                progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, d) mean embedding of each class's labelled pixels over every whole image of `dataset`, and (C,) pixel counts.

    Each pixel embedding is L2-normalised first when the run normalises (the readout compares normalised
    embeddings). Under torchrun each process reads its share of the images and the sums are of all of them.
    """
    model.eval()
    head = model.head
    sums = torch.zeros(head.num_classes, head.embeddings.shape[1], dtype=torch.float64, device=device)
    counts = torch.zeros(head.num_classes, dtype=torch.float64, device=device)
    samples = torch.utils.data.Subset(EvalSamples(dataset), distributed.shard(len(dataset.images)))
    loader = torch.utils.data.DataLoader(samples, batch_size=1)
    for image, mask, _ in tqdm(loader, desc="pixel means", unit="img", disable=not progress, dynamic_ncols=True):
        output = model(image.to(device)).float()
        labelled = mask.to(device) > 0
        pixels = output.permute(0, 2, 3, 1)[labelled]
        if head.normalize:
            pixels = torch.nn.functional.normalize(pixels, dim=1)
        target = mask.to(device)[labelled] - 1
        sums.index_add_(0, target, pixels.double())
        counts += torch.bincount(target, minlength=head.num_classes).double()
    return distributed.all_reduce_sum(sums), distributed.all_reduce_sum(counts)


def pixel_mean_readout(model: Segmenter, dataset: BuiltDataset, device: torch.device,
                       progress: bool = False) -> Segmenter:
    """A copy of an ESS `model` whose class embeddings are the mean embeddings of their pixels in `dataset`
    (a class with no pixel there keeps its learned embedding)."""
    if not isinstance(model.head, EssHead):
        raise InputError(None, "--readout pixel-mean needs an ESS run: a softmax head has no class embeddings")
    sums, counts = pixel_means(model, dataset, device, progress)
    readout = copy.deepcopy(model)
    seen = counts > 0
    embeddings = readout.head.embeddings.detach().clone()
    embeddings[seen] = (sums[seen] / counts[seen, None]).to(embeddings.dtype)
    with torch.no_grad():
        readout.head.embeddings.copy_(embeddings)
    return readout.eval()
