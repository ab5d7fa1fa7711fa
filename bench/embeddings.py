"""`bench embeddings`: what an ESS run learned about its classes and one image's pixels.

The ESS head places every class at a learned point of a small embedding space and
labels a pixel with its nearest class. This module looks at that space: class
embedding length against training frequency, one image's pixel embeddings in 2D
(PCA) beside the class embeddings, the same pixels in 3D shown as RGB, and how the
class embeddings group (agglomerative clustering and k-means).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from bench.definitions import GROUP_COLORS, GROUPS
from bench.tables import frequency_order, read_class_stats
from bench.report import (files_section, fmt, markdown_table, new_figure, plural, save_figure, save_table,
                          write_summary)
from cocolvis.dataset import BuiltDataset
from segkit.io import InputError, write_text


def most_classes_image(dataset: BuiltDataset, progress: bool = True) -> dict:
    """The image record whose mask holds the most distinct classes (the first of equals)."""
    from tqdm import tqdm

    if not dataset.images:
        raise InputError(dataset.root / "images.jsonl", "no images")
    best, best_count = None, -1
    for record in tqdm(dataset.images, desc="picking the image with most classes", unit="mask", disable=not progress):
        mask = dataset.read_mask(record["id"])
        count = int(np.count_nonzero(np.bincount(mask.ravel(), minlength=dataset.num_classes + 1)[1:]))
        if count > best_count:
            best, best_count = record, count
    return best


def find_image(dataset: BuiltDataset, image_id: int) -> dict:
    for record in dataset.images:
        if int(record["id"]) == image_id:
            return record
    raise InputError(dataset.root / "images.jsonl", f"no image with id {image_id}")


def training_stats(run_config: dict, data: Path) -> tuple[pd.DataFrame, Path]:
    """Per-class counts of the data the run was trained on, or of `data` when that build is gone."""
    train = Path(run_config["data"]) if run_config.get("data") else None
    source = train if train is not None and (train / "stats.csv").exists() else data
    return read_class_stats(source), source


def embed_image(model, image: np.ndarray, device: str) -> tuple[np.ndarray, np.ndarray]:
    """Pixel embeddings (H, W, d) and predicted class ids (H, W) of one RGB image."""
    import torch

    from ess.data import to_tensor

    with torch.inference_mode():
        output = model(to_tensor(image)[None].to(device))
        pred = model.predict(output)[0]
    return output[0].permute(1, 2, 0).float().cpu().numpy(), pred.cpu().numpy()


def pca_rgb(pixels: np.ndarray) -> np.ndarray:
    """(H, W, d) embeddings -> (H, W, 3) uint8: the first three principal components, each stretched
    between its 1st and 99th percentile."""
    from sklearn.decomposition import PCA

    h, w, d = pixels.shape
    flat = pixels.reshape(-1, d)
    comps = PCA(n_components=min(3, d), random_state=0).fit_transform(flat)
    if comps.shape[1] < 3:
        comps = np.pad(comps, ((0, 0), (0, 3 - comps.shape[1])))
    lo, hi = np.percentile(comps, 1, axis=0), np.percentile(comps, 99, axis=0)
    rgb = np.clip((comps - lo) / np.where(hi > lo, hi - lo, 1.0), 0, 1)
    return (rgb.reshape(h, w, 3) * 255 + 0.5).astype(np.uint8)


def plot_pixels_2d(pixels: np.ndarray, mask: np.ndarray, class_emb: np.ndarray, names: list[str],
                   max_points: int, title: str):
    """Labelled pixels projected by PCA to 2D, coloured by ground truth; the image's classes as stars."""
    from sklearn.decomposition import PCA

    from ess.visualize import palette

    labelled = np.flatnonzero(mask.ravel() > 0)
    if labelled.size == 0:
        raise ValueError("the image has no labelled pixel")
    rng = np.random.default_rng(0)
    sample = rng.choice(labelled, size=min(max_points, labelled.size), replace=False)
    flat = pixels.reshape(-1, pixels.shape[-1])
    labels = mask.ravel()[sample].astype(np.int64)
    present = np.unique(mask[mask > 0]).astype(np.int64)
    pca = PCA(n_components=2, random_state=0).fit(flat[labelled])
    xy = pca.transform(flat[sample])
    stars = pca.transform(class_emb[present - 1])
    colors = palette(int(present.max()) + 1) / 255.0

    fig = new_figure(9, 7)
    ax = fig.add_subplot()
    ax.scatter(xy[:, 0], xy[:, 1], c=colors[labels], s=4, alpha=0.5, linewidths=0)
    for (x, y), cid in zip(stars, present):
        ax.scatter([x], [y], marker="*", s=320, color=colors[cid], edgecolors="black", linewidths=0.8, zorder=3,
                   label=names[cid - 1])
        ax.annotate(names[cid - 1], (x, y), xytext=(6, 6), textcoords="offset points", fontsize=8)
    ax.set_xlabel(f"PC 1 ({pca.explained_variance_ratio_[0]:.0%} of pixel variance)")
    ax.set_ylabel(f"PC 2 ({pca.explained_variance_ratio_[1]:.0%})")
    ax.set_title(title)
    if len(present) <= 20:
        ax.legend(fontsize=7, loc="best", markerscale=0.5)
    return fig


def plot_pixels_rgb(image: np.ndarray, mask: np.ndarray, rgb: np.ndarray, pred: np.ndarray, title: str):
    from ess.visualize import colorize

    fig = new_figure(16, 4.6)
    panels = [(image, "image"), (colorize(mask), "ground truth"), (rgb, "pixel embeddings, PCA to RGB"),
              (colorize(pred), "prediction (nearest class embedding)")]
    for i, (img, label) in enumerate(panels, 1):
        ax = fig.add_subplot(1, 4, i)
        ax.imshow(img, interpolation="nearest")
        ax.set_title(label)
        ax.set_axis_off()
    fig.suptitle(title)
    return fig


def plot_frequency_length(table: pd.DataFrame, normalize: bool):
    fig = new_figure(8, 5)
    ax = fig.add_subplot()
    seen = table[table["train_pixels"] > 0]
    for group, rows in seen.groupby("group", sort=False):
        ax.scatter(rows["train_pixels"], rows["length"], s=14, color=GROUP_COLORS[group], label=GROUPS[group], alpha=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("training pixels of the class")
    ax.set_ylabel("class embedding length (raw, before any normalisation)")
    note = " (the run normalises: lengths do not affect prediction)" if normalize else ""
    ax.set_title("Class frequency against embedding length" + note, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    if len(seen):
        ax.legend(fontsize=8)
    return fig


def frequent_classes(table: pd.DataFrame, most: int) -> pd.DataFrame:
    """The `most` most frequent classes by training pixels, among those seen in training when at least 2 were."""
    ordered = frequency_order(table.rename(columns={"train_pixels": "pixels", "train_images": "images"}), "pixels")
    seen = ordered[ordered["pixels"] > 0]
    return table.loc[(seen if len(seen) >= 2 else ordered).index[:most]]


def ward_tree(class_emb: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ward linkage of the classes `ids` (1-based) and its leaves' ids, top to bottom as drawn."""
    from scipy.cluster.hierarchy import dendrogram, linkage

    links = linkage(class_emb[ids - 1].astype(np.float64), method="ward")
    order = dendrogram(links, no_plot=True)["leaves"]
    return links, ids[np.asarray(order)[::-1]]  # a left-oriented tree lists its leaves bottom to top


def plot_dendrogram(links: np.ndarray, names: list[str]):
    """The Ward tree of `ward_tree`, its classes' `names` in the order they were given to it."""
    from scipy.cluster.hierarchy import dendrogram

    fig = new_figure(8, 1.5 + 0.17 * len(names))
    ax = fig.add_subplot()
    dendrogram(links, labels=names, orientation="left", ax=ax, leaf_font_size=8,
               color_threshold=0.7 * links[:, 2].max() if len(links) else 0)
    ax.set_xlabel("Ward linkage distance")
    ax.set_title(f"Agglomerative clustering of the class embeddings ({len(names)} most frequent classes)")
    return fig


def kmeans_clusters(class_emb: np.ndarray, k: int) -> np.ndarray:
    from sklearn.cluster import KMeans

    k = min(k, len(class_emb))
    return KMeans(n_clusters=k, n_init=10, random_state=0).fit_predict(class_emb.astype(np.float64))


def cluster_lists(table: pd.DataFrame) -> pd.DataFrame:
    """One row per k-means cluster, its class names most frequent first; clusters with most training pixels first."""
    rows = []
    for cluster, members in table.groupby("cluster"):
        members = members.sort_values(["train_pixels", "train_images"], ascending=False, kind="stable")
        rows.append({"cluster": int(cluster), "size": len(members), "train_pixels": int(members["train_pixels"].sum()),
                     "classes": "; ".join(members["name"])})
    return pd.DataFrame(rows).sort_values(["train_pixels", "size"], ascending=False, kind="stable")


def embedding_tables(run_dir: Path, data: Path, *, images_root=None, image_id: int | None = None,
                     checkpoint: str = "best", clusters: int = 70, dendrogram_classes: int = 100, device: str = "auto",
                     progress: bool = True) -> dict:
    """Everything the analysis shows, computed: per-class table, clusters, dendrogram leaves, one image embedded."""
    from scipy.stats import spearmanr

    from ess import config as run_config
    from ess.data import load_pair
    from ess.device import pick_device
    from ess.run import load_run

    config = run_config.load(run_dir / "config.yaml").to_dict()
    if config.get("head") != "ess":
        raise InputError(run_dir / "config.yaml", f"head is {config.get('head')!r}: `bench embeddings` needs an ESS run "
                         "(a softmax run has no class embeddings)")
    dataset = BuiltDataset(data, images_root)
    record = find_image(dataset, image_id) if image_id is not None else None
    device = pick_device(device)
    run = load_run(run_dir, checkpoint=checkpoint, device=device)
    head = run.model.head
    class_emb = head.class_embeddings().detach().float().cpu().numpy()
    raw = head.embeddings.detach().float().cpu().numpy()
    num_classes = len(class_emb)

    stats, stats_source = training_stats(config, data)
    if len(stats) != num_classes:
        raise InputError(stats_source / "stats.csv", f"{len(stats)} classes, but the run has {num_classes}")
    if dataset.num_classes != num_classes:
        raise InputError(dataset.root / "classes.json", f"{dataset.num_classes} classes, but the run has {num_classes}")

    table = pd.DataFrame({"name": stats["name"], "source": stats["source"], "group": stats["group"],
                          "train_pixels": stats["pixels"], "train_images": stats["images"],
                          "length": np.linalg.norm(raw, axis=1)}, index=stats.index)
    table.index.name = "id"
    table["cluster"] = kmeans_clusters(class_emb, clusters)

    if record is None:
        record = most_classes_image(dataset, progress)
    image, mask = load_pair(dataset, record)
    if not (mask > 0).any():
        raise InputError(dataset.mask_path(record["id"]), "the image has no labelled pixel to project")
    pixels, pred = embed_image(run.model, image, device)
    labelled = mask > 0

    tree_ids = frequent_classes(table, dendrogram_classes).index.to_numpy()
    links, leaves = ward_tree(class_emb, tree_ids)
    leaf_table = pd.DataFrame({"position": np.arange(1, len(leaves) + 1), "id": leaves,
                               "name": table.loc[leaves, "name"].to_numpy(),
                               "train_pixels": table.loc[leaves, "train_pixels"].to_numpy(),
                               "cluster": table.loc[leaves, "cluster"].to_numpy()})
    seen = table[table["train_pixels"] > 0]
    rho = spearmanr(seen["train_pixels"], seen["length"]).statistic if len(seen) >= 3 else float("nan")
    return {"config": config, "normalize": bool(config.get("normalize", True)), "class_emb": class_emb,
            "table": table, "clusters": cluster_lists(table), "links": links, "tree_names": table.loc[tree_ids, "name"].tolist(),
            "leaves": leaf_table,
            "stats_source": stats_source, "record": record, "image": image, "mask": mask, "pixels": pixels,
            "pred": pred, "pixel_acc": float((pred[labelled] == mask[labelled]).mean()),
            "present": np.unique(mask[labelled]), "seen": len(seen), "rho": rho}


def embeddings_summary(res: dict, run_dir: Path, data: Path, out: Path, *, image_id, checkpoint: str, clusters: int,
                       dendrogram_classes: int) -> str:
    table, config, record = res["table"], res["config"], res["record"]
    num_classes, normalize = len(table), res["normalize"]
    if normalize:
        length_note = ("This run normalises its embeddings (pixels and classes are compared on the unit sphere), so "
                       "the raw length of a class embedding does not affect prediction: the frequency-length plot is "
                       "only meaningful for a run trained with `--no-norm`.")
    else:
        length_note = ("This run does not normalise its embeddings: a pixel takes the class embedding nearest to it, "
                       "so lengths shape the decision regions, and the plot shows whether training frequency drives them.")
    shown_clusters = res["clusters"].head(10).assign(
        classes=lambda d: [c if c.count("; ") < 8 else "; ".join(c.split("; ")[:8]) + "; ..." for c in d["classes"]])
    n_leaves = len(res["leaves"])
    lines = [
        f"# Embeddings of the ESS run `{run_dir}`",
        "",
        f"- run: encoder {config.get('encoder')}, embedding dimension {res['class_emb'].shape[1]}, "
        f"normalize {normalize}, checkpoint {checkpoint}, {num_classes} classes",
        f"- class frequencies from `{res['stats_source'] / 'stats.csv'}`"
        + (" (the run's training data)" if res["stats_source"] != data else ""),
        f"- image: id {record['id']} (`{record['file']}`) of `{data}`, "
        + ("chosen with --image-id" if image_id is not None else "the image with the most classes")
        + f": {len(res['present'])} classes, pixel accuracy of the prediction {res['pixel_acc']:.1%}",
        "",
        f"Frequency against length: Spearman rank correlation {fmt(res['rho'], 3)} over the {res['seen']} classes "
        f"seen in training. {length_note}",
        "",
        f"Dendrogram: Ward linkage of the {n_leaves} most frequent training classes"
        + (" (only classes with training pixels)" if n_leaves < min(dendrogram_classes, num_classes) else "") + ".",
        "",
        f"k-means: {table['cluster'].nunique()} clusters of the {num_classes} class embeddings "
        f"(k = min(--clusters {clusters}, classes)); the 10 with most training pixels:",
        "",
        markdown_table(shown_clusters[["cluster", "size", "train_pixels", "classes"]]),
        "",
        files_section(out, {
            "embeddings.csv": "one row per class: id, name, source, group, train_pixels, train_images, length "
                              "(raw embedding norm), cluster (k-means)",
            "clusters.csv": "one row per k-means cluster: its classes by name, most frequent first",
            "clusters.txt": "the same as plain name lists, one line per cluster",
            "dendrogram.csv": "the dendrogram's leaves top to bottom: position, id, name, train_pixels, cluster",
            "frequency_length.png": "training pixels (log) against class-embedding length, by frequency group",
            "pixels_2d.png": "the image's labelled pixels, PCA to 2D, coloured by ground truth; stars: class embeddings",
            "pixels_rgb.png": "image, ground truth, pixel embeddings PCA to RGB, prediction",
            "dendrogram.png": "agglomerative clustering of the class embeddings, labelled by class name",
        }),
    ]
    return "\n".join(lines)


def run_embeddings(run_dir: str | Path, data: str | Path, out: str | Path, *, images_root=None,
                   image_id: int | None = None, checkpoint: str = "best", clusters: int = 70,
                   dendrogram_classes: int = 100, max_points: int = 5000, device: str = "auto",
                   echo: bool = True, progress: bool = True) -> dict[str, Path]:
    """Write the embedding analysis of an ESS run, with one image of `data`, into `out`: tables, figures, summary."""
    run_dir, data, out = Path(run_dir), Path(data), Path(out)
    res = embedding_tables(run_dir, data, images_root=images_root, image_id=image_id, checkpoint=checkpoint,
                           clusters=clusters, dendrogram_classes=dendrogram_classes, device=device, progress=progress)
    table, cluster_table, leaves = res["table"], res["clusters"], res["leaves"]

    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "clusters.txt", "".join(f"cluster {r.cluster} ({plural(r.size, 'class')}): "
                                             f"{r.classes.replace('; ', ', ')}\n" for r in cluster_table.itertuples()))
    paths = {
        "embeddings.csv": save_table(table.reset_index(), out / "embeddings.csv"),
        "clusters.csv": save_table(cluster_table, out / "clusters.csv"),
        "clusters.txt": out / "clusters.txt",
        "dendrogram.csv": save_table(leaves, out / "dendrogram.csv"),
    }

    record = res["record"]
    title = f"image {record['id']} ({record['file']}), {len(res['present'])} classes"
    figures = {
        "frequency_length.png": plot_frequency_length(table, res["normalize"]),
        "pixels_2d.png": plot_pixels_2d(res["pixels"], res["mask"], res["class_emb"], table["name"].tolist(),
                                        max_points, title),
        "pixels_rgb.png": plot_pixels_rgb(res["image"], res["mask"], pca_rgb(res["pixels"]), res["pred"], title),
        "dendrogram.png": plot_dendrogram(res["links"], res["tree_names"]),
    }
    paths.update({name: save_figure(fig, out / name) for name, fig in figures.items()})

    text = embeddings_summary(res, run_dir, data, out, image_id=image_id, checkpoint=checkpoint, clusters=clusters,
                              dendrogram_classes=dendrogram_classes)
    paths["summary.md"] = write_summary(out, text, echo=echo)
    return paths
