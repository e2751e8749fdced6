"""run-eval's counts equal a plain torchvision DataLoader evaluation loop with the same model.

The labels are chosen from the reference's own predictions (its top-1, its 2nd..5th choice, or a
class outside its top 5), so the expected top-1 and top-5 counts are far from zero and any
preprocessing, normalisation, ordering or counting difference changes them.
"""

import json
import os

import numpy as np
import pytest
import torch

from engine.config import resolve_config
from engine.pipeline.dataset import build_dataset
from engine.evaluate import run_eval

N = 48


@pytest.fixture(scope="module")
def model_and_reference(flat_set, tmp_path_factory):
    import torchvision
    from torchvision import transforms

    tmp = tmp_path_factory.mktemp("ref")
    torch.manual_seed(1234)
    net = torchvision.models.resnet18(num_classes=1000).eval()
    weights = str(tmp / "resnet18.pth")
    torch.save(net.state_dict(), weights)

    ds = build_dataset(flat_set, limit=N)
    tf = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
                             transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])

    class Files(torch.utils.data.Dataset):
        def __len__(self):
            return len(ds)

        def __getitem__(self, i):
            return tf(torchvision.datasets.folder.pil_loader(ds.abspath(i))), i

    top5 = {}
    with torch.inference_mode():
        for x, idx in torch.utils.data.DataLoader(Files(), batch_size=8, num_workers=0):
            for i, row in zip(idx.tolist(), net(x).topk(6).indices.tolist()):
                top5[i] = row
    # labels: rank 0 for a third, ranks 1-4 for a third, rank 5 (a miss) for the rest
    labels = [top5[i][[0, 0, 1, 2, 3, 4, 5, 5, 5][i % 9]] for i in range(len(ds))]
    label_file = str(tmp / "labels.txt")
    everything = build_dataset(flat_set)  # every file needs a line; the run takes --limit N
    assert everything.paths[:N] == ds.paths
    with open(label_file, "w") as f:
        for i, path in enumerate(everything.paths):
            f.write(f"{os.path.splitext(path)[0]} {labels[i] if i < N else 0}\n")
    ref1 = sum(labels[i] == top5[i][0] for i in range(len(ds)))
    ref5 = sum(labels[i] in top5[i][:5] for i in range(len(ds)))
    return weights, label_file, ds, ref1, ref5


@pytest.mark.parametrize("batch, workers", [(8, 1), (13, 2)])
def test_counts_equal_plain_dataloader_loop(model_and_reference, flat_set, tmp_path, batch, workers):
    weights, label_file, ds, ref1, ref5 = model_and_reference
    assert 0 < ref1 < ref5 < len(ds)
    cfg = resolve_config("resnet18", data=flat_set, labels=label_file, weights=weights, backend="cpu", limit=N,
                         batch_size=batch, workers=workers, progress=False, compute_only_iters=1,
                         json_path=str(tmp_path / "r.json"))
    report, status = run_eval(cfg, out=open(os.devnull, "w"))
    assert status == 0
    assert (report["images"], report["failed"]) == (len(ds), 0)
    assert (report["correct_top1"], report["correct_top5"]) == (ref1, ref5)
    assert report["top1"] == pytest.approx(100.0 * ref1 / len(ds))
    saved = json.load(open(tmp_path / "r.json"))
    assert saved["correct_top5"] == ref5
    assert sum(c["images"] for c in saved["per_class"]) == len(ds)
    assert saved["throughput"]["end_to_end"] > 0 and saved["throughput"]["compute_only"] > 0


def test_normalisation_matches_totensor_normalize():
    """The on-device input adapter equals ToTensor -> Normalize within 1e-6."""
    from torchvision import transforms
    from PIL import Image

    from engine.models.zoo import InputAdapter

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (3, 40, 30, 3), dtype=np.uint8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    got = InputAdapter(mean, std)(torch.from_numpy(pixels))
    ref = torch.stack([transforms.Normalize(mean, std)(transforms.ToTensor()(Image.fromarray(p))) for p in pixels])
    assert got.shape == ref.shape
    assert torch.allclose(got, ref, atol=1e-6, rtol=0)
    assert got.is_contiguous(memory_format=torch.channels_last)
