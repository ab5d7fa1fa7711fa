"""Fixed class colours and overlays."""
import numpy as np

from ess.visualize import colorize, overlay_with_legend, palette


def test_fixed_distinct_colours():
    labels = np.arange(1285).reshape(5, 257)
    rgb = colorize(labels)
    assert rgb.shape == (5, 257, 3) and rgb.dtype == np.uint8
    assert rgb[0, 0].tolist() == [0, 0, 0]
    assert len({tuple(c) for c in rgb.reshape(-1, 3)}) == 1285
    # The same id always gets the same colour, whatever else is in the map.
    assert colorize(np.array([[1284, 5]]))[0, 0].tolist() == rgb.reshape(-1, 3)[1284].tolist()
    assert palette(3).tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0]]


def test_overlay_with_legend_lists_present_classes():
    image = np.full((40, 60, 3), 200, dtype=np.uint8)
    labels = np.zeros((40, 60), dtype=np.int64)
    labels[:20] = 2
    labels[20:, :10] = 7
    out = overlay_with_legend(image, labels, [f"class{i}" for i in range(1, 10)])
    assert out.dtype == np.uint8 and out.shape[1] > 60
    assert out.shape[0] >= 40
    assert (out[30, 30] == 200).all()                        # unlabeled pixels keep the image
    assert out[5, 5].tolist() == [100, 164, 100]             # half image, half colour of id 2 (0, 128, 0)
    panel = out[:, 60:]
    colours = {tuple(c) for c in panel.reshape(-1, 3)}
    assert tuple(palette(8)[7]) in colours and tuple(palette(3)[2]) in colours
    assert tuple(palette(4)[3]) not in colours
