"""mIoU, mean accuracy and pixel accuracy against values worked out by hand."""
import math

import pytest
import torch

from fcmae.labelmaps import IGNORE
from fcmae.segment.metrics import confusion_metric, scores


def test_scores_by_hand():
    # 4 classes; class 3 appears in neither truth nor prediction; two pixels ignored
    truth = torch.tensor([[0, 0, 0, 1], [1, 1, 2, 2], [IGNORE, IGNORE, 0, 2]])
    prediction = torch.tensor([[0, 0, 1, 1], [1, 2, 2, 2], [0, 1, 0, 0]])
    metric = confusion_metric(4)
    metric.update(prediction[None], truth[None])
    confusion = metric.compute()
    # rows: truth, columns: prediction (ignored pixels not counted)
    assert confusion.tolist() == [[3, 1, 0, 0], [0, 2, 1, 0], [1, 0, 2, 0], [0, 0, 0, 0]]
    result = scores(confusion)
    # IoU: class 0 3/(4+4-3)=3/5, class 1 2/(3+3-2)=2/4, class 2 2/(3+3-2)=2/4, class 3 absent: left out
    assert result["IoU"][:3].tolist() == pytest.approx([60.0, 50.0, 50.0]) and math.isnan(result["IoU"][3])
    assert result["mIoU"] == pytest.approx((60 + 50 + 50) / 3)
    # accuracy per class: 3/4, 2/3, 2/3; pixel accuracy 7 of 10 labelled pixels
    assert result["Acc"][:3].tolist() == pytest.approx([75.0, 200 / 3, 200 / 3]) and math.isnan(result["Acc"][3])
    assert result["mAcc"] == pytest.approx((75 + 200 / 3 + 200 / 3) / 3)
    assert result["aAcc"] == pytest.approx(70.0)


def test_a_class_predicted_but_absent_from_the_truth_counts_with_iou_zero():
    confusion = torch.tensor([[5, 1], [0, 0]])  # class 1 only predicted
    result = scores(confusion)
    assert result["IoU"].tolist()[0] == pytest.approx(500 / 6) and result["IoU"].tolist()[1] == 0.0
    assert result["mIoU"] == pytest.approx((500 / 6 + 0) / 2)
    assert result["mAcc"] == pytest.approx(500 / 6)  # accuracy: only classes in the truth


def test_batches_accumulate_as_one_confusion_matrix():
    torch.manual_seed(0)
    truth, prediction = torch.randint(0, 3, (4, 8, 8)), torch.randint(0, 3, (4, 8, 8))
    truth[0, 0] = IGNORE
    together, apart = confusion_metric(3), confusion_metric(3)
    together.update(prediction, truth)
    for i in range(4):
        apart.update(prediction[i:i + 1], truth[i:i + 1])
    assert torch.equal(together.compute(), apart.compute())
    assert int(together.compute().sum()) == 4 * 64 - 8


def _rank(rank, init, out):
    import torch.distributed as dist
    torch.set_num_threads(1)  # a forked child: no OpenMP pool of the parent's
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    g = torch.Generator().manual_seed(rank)
    truth = torch.randint(0, 3, (1 + rank, 8, 8), generator=g)  # rank 0: one image, rank 1: two
    prediction = torch.randint(0, 3, (1 + rank, 8, 8), generator=g)
    metric = confusion_metric(3)
    metric.update(prediction, truth)
    torch.save({"mine": confusion_metric(3).to("cpu").forward(prediction, truth), "all": metric.compute()},
               f"{out}.{rank}")
    dist.destroy_process_group()


def test_the_confusion_matrix_is_summed_over_ranks(tmp_path):
    """Two processes over gloo, one image and two images: each computes the sum of both (ranks may
    hold different image counts, as the validation split across ranks gives them)."""
    import torch.multiprocessing as mp
    mp.start_processes(_rank, args=(f"file://{tmp_path / 'init'}", str(tmp_path / "out")), nprocs=2,
                       start_method="fork")  # no re-import of torch in each process
    results = [torch.load(tmp_path / f"out.{r}") for r in range(2)]
    total = results[0]["mine"] + results[1]["mine"]
    assert torch.equal(results[0]["all"], total) and torch.equal(results[1]["all"], total)
    assert int(total.sum()) == 3 * 64
