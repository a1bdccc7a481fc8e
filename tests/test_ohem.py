"""Tests of OHEM: ``MODEL.ROI_HEADS.NAME: LibraGHMROIHeads`` with ``MODEL.ROI_HEADS.SAMPLER:
OHEMSampler`` (libraghm/modeling/roi_heads.py, libraghm/sampling/ohem_sampler.py) and the box
predictor's per-RoI losses (libraghm/modeling/fast_rcnn.py).

The selection is checked against a separate, loop-based implementation (per-RoI losses written
out by hand, greedy NMS in Python), the gradients against a box-head loss computed on the
selected RoIs only, and tiny Faster/Mask R-CNN training steps end to end.
"""

import math

import pytest
import torch

from detectron2.config import get_cfg
from detectron2.layers import cat
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances, pairwise_iou
from detectron2.utils.events import EventStorage

from conftest import get_config, tiny_batch
from libraghm import add_libraghm_config
from libraghm.losses import GHMR, BalancedL1Loss, balanced_l1_loss
from libraghm.modeling import LibraGHMFastRCNNOutputLayers, LibraGHMROIHeads
from libraghm.modeling.roi_heads import SAMPLING_PARAMS
from libraghm.sampling import RandomSampler
from libraghm.sampling.ohem_sampler import OHEMSampler, ohem_select_mmdet, ohem_select_paper
from libraghm.validation import cfg_node

H, W = 128, 160
NUM_CLASSES = 5


def make_cfg(**overrides):
    """Tiny OHEM Faster R-CNN config on CPU (Shapes paper-mode config), dotted-key overrides."""
    cfg = get_config("Shapes-Detection/ohem_faster_rcnn.yaml")
    cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = 64
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 16
    cfg.MODEL.ROI_BOX_HEAD.FC_DIM = 64
    for k, v in overrides.items():
        node = cfg
        *path, last = k.split(".")
        for p in path:
            node = node[p]
        node[last] = v
    return cfg


def build(cfg, seed=0):
    torch.manual_seed(seed)
    model = build_model(cfg)
    model.train()
    return model


def sharpen_predictor(heads, seed=0):
    """Larger predictor weights than Detectron2's init, so that per-RoI losses differ clearly."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lin in (heads.box_predictor.cls_score, heads.box_predictor.bbox_pred):
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 0.05)
            lin.bias.copy_(torch.randn(lin.bias.shape, generator=g) * 0.5)


def random_features(num_images, channels=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        f"p{l}": torch.randn(num_images, channels, H // 2**l, W // 2**l, generator=g)
        for l in (2, 3, 4, 5, 6)
    }


def random_boxes(n, g, min_size=6.0, max_size=70.0):
    xy = torch.rand(n, 2, generator=g) * torch.tensor([W - max_size, H - max_size])
    wh = min_size + torch.rand(n, 2, generator=g) * (max_size - min_size)
    return torch.cat([xy, xy + wh], dim=1)


def jitter(boxes, n, g, scale=6.0):
    """n boxes scattered around the given ones (so that some proposals are positives)."""
    base = boxes[torch.randint(len(boxes), (n,), generator=g)]
    out = base + (torch.rand(n, 4, generator=g) - 0.5) * 2 * scale
    out[:, 2:] = torch.maximum(out[:, 2:], out[:, :2] + 2.0)
    return out


def make_targets(num_gt, g):
    t = Instances((H, W))
    t.gt_boxes = Boxes(random_boxes(num_gt, g, min_size=16.0, max_size=60.0))
    t.gt_classes = torch.randint(NUM_CLASSES, (num_gt,), generator=g)
    return t


def make_proposals(boxes):
    p = Instances((H, W))
    p.proposal_boxes = Boxes(boxes)
    p.objectness_logits = torch.zeros(len(boxes))
    return p


def make_roi_inputs(num_gts=(3, 2), num_random=30, num_jitter=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    targets, proposals = [], []
    for n in num_gts:
        t = make_targets(n, g)
        boxes = random_boxes(num_random, g)
        if n > 0:
            boxes = torch.cat([boxes, jitter(t.gt_boxes.tensor, num_jitter, g)])
        targets.append(t)
        proposals.append(make_proposals(boxes))
    return proposals, targets


def candidates_of(heads, proposals, targets):
    with EventStorage():
        return heads.label_and_sample_proposals(proposals, targets)


# ------------------------------------------------------------------------------------------------
# Straightforward reference: per-RoI losses by hand, greedy NMS with Python loops.
# ------------------------------------------------------------------------------------------------
def ref_smooth_l1(x, beta):
    x = abs(x)
    return 0.5 * x * x / beta if (beta > 0 and x < beta) else x - 0.5 * beta


def ref_iou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def ref_losses_one_image(heads, features, cand, image_index, beta, wts=(10.0, 10.0, 5.0, 5.0)):
    """Per-RoI (cls, reg) losses of one image, one box-head pass per image, losses by hand."""
    feats = [features[f][image_index : image_index + 1] for f in heads.box_in_features]
    with torch.no_grad():
        scores, deltas = heads.box_predictor(
            heads.box_head(heads.box_pooler(feats, [cand.proposal_boxes]))
        )
    cls, reg = [], []
    for j in range(len(cand)):
        label = int(cand.gt_classes[j])
        logits = scores[j].tolist()
        m = max(logits)
        lse = m + math.log(sum(math.exp(v - m) for v in logits))
        cls.append(lse - logits[label])
        if label == NUM_CLASSES:
            reg.append(0.0)
            continue
        px0, py0, px1, py1 = cand.proposal_boxes.tensor[j].tolist()
        gx0, gy0, gx1, gy1 = cand.gt_boxes.tensor[j].tolist()
        pw, ph, gw, gh = px1 - px0, py1 - py0, gx1 - gx0, gy1 - gy0
        target = [
            wts[0] * ((gx0 + gw / 2) - (px0 + pw / 2)) / pw,
            wts[1] * ((gy0 + gh / 2) - (py0 + ph / 2)) / ph,
            wts[2] * math.log(gw / pw),
            wts[3] * math.log(gh / ph),
        ]
        pred = deltas[j, 4 * label : 4 * label + 4].tolist()
        reg.append(sum(ref_smooth_l1(p - t, beta) for p, t in zip(pred, target)))
    return cls, reg


def ref_select_paper(losses, boxes, b, nms_thresh):
    """Greedy NMS over the loss-ranked RoIs, then the top b; also returns all NMS survivors."""
    order = sorted(range(len(losses)), key=lambda i: -losses[i])
    kept = []
    for i in order:
        if nms_thresh < 1.0 and any(ref_iou(boxes[i], boxes[k]) > nms_thresh for k in kept):
            continue
        kept.append(i)
    return kept[:b], kept


def ref_select_mmdet(losses, labels, b, fraction):
    pos = sorted([i for i, l in enumerate(labels) if l < NUM_CLASSES], key=lambda i: -losses[i])
    neg = sorted([i for i, l in enumerate(labels) if l == NUM_CLASSES], key=lambda i: -losses[i])
    pos = pos[: int(b * fraction)]
    return pos + neg[: b - len(pos)]


def min_loss_gap(losses):
    """Smallest gap between two losses (tie guard: float noise must not reorder the ranking)."""
    s = sorted(losses)
    return min(b - a for a, b in zip(s, s[1:]))


# ------------------------------------------------------------------------------------------------
# Selection equals the independently computed top-loss set.
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("nms_thresh", [0.7, 0.5, 1.0])
def test_paper_selection_matches_reference(nms_thresh):
    beta = 0.5
    cfg = make_cfg(
        **{"MODEL.ROI_HEADS.OHEM.NMS_THRESH": nms_thresh, "MODEL.ROI_BOX_HEAD.SMOOTH_L1_BETA": beta}
    )
    heads = build(cfg).roi_heads
    sharpen_predictor(heads)
    proposals, targets = make_roi_inputs(num_gts=(3, 2))
    features = random_features(2)
    cands = candidates_of(heads, proposals, targets)
    got = heads.hard_example_indices(features, cands)

    # the batched per-RoI losses equal the hand-written ones
    with torch.no_grad():
        feats = [features[f] for f in heads.box_in_features]
        preds = heads.box_predictor(
            heads.box_head(heads.box_pooler(feats, [c.proposal_boxes for c in cands]))
        )
        batched = heads.box_predictor.per_roi_losses(preds, cands, with_box_reg=True)
    offset, num_after_nms = 0, []
    for i, cand in enumerate(cands):
        cls, reg = ref_losses_one_image(heads, features, cand, i, beta)
        n = len(cand)
        assert torch.allclose(
            batched["loss_cls"][offset : offset + n], torch.tensor(cls), atol=1e-4
        )
        assert torch.allclose(
            batched["loss_box_reg"][offset : offset + n], torch.tensor(reg), atol=1e-4
        )
        assert max(reg) > 0.1  # foreground RoIs do contribute a regression loss
        offset += n
        total = [c + r for c, r in zip(cls, reg)]
        want, survivors = ref_select_paper(
            total, cand.proposal_boxes.tensor.tolist(), 16, nms_thresh
        )
        num_after_nms.append(len(survivors))
        assert len(want) == 16 < len(survivors)  # the top-B cut really cuts
        assert min_loss_gap(total) > 1e-5
        assert sorted(got[i].tolist()) == sorted(want)
        # largest loss first
        assert got[i].tolist() == want
    if nms_thresh < 1.0:
        assert all(n < len(c) for n, c in zip(num_after_nms, cands))  # NMS removed some RoIs


def test_mmdet_selection_matches_reference():
    cfg = make_cfg(
        **{"MODEL.ROI_HEADS.OHEM.MODE": "mmdet", "MODEL.ROI_HEADS.POSITIVE_FRACTION": 0.25}
    )
    heads = build(cfg).roi_heads
    sharpen_predictor(heads, seed=1)
    proposals, targets = make_roi_inputs(num_gts=(3, 1), num_jitter=40, seed=1)
    features = random_features(2, seed=1)
    cands = candidates_of(heads, proposals, targets)
    got = heads.hard_example_indices(features, cands)
    for i, cand in enumerate(cands):
        cls, _ = ref_losses_one_image(heads, features, cand, i, beta=0.0)
        labels = cand.gt_classes.tolist()
        want = ref_select_mmdet(cls, labels, 16, 0.25)
        assert min_loss_gap(cls) > 1e-5
        assert sum(l < NUM_CLASSES for l in labels) > 4  # more positives than the quota
        assert sorted(got[i].tolist()) == sorted(want)
        sel_labels = cand.gt_classes[got[i]]
        assert int((sel_labels < NUM_CLASSES).sum()) == 4  # int(16 * 0.25)


def box_head_predictions(heads, features, cands):
    """The box predictor's outputs for the candidates of all images (one pass, no grad)."""
    with torch.no_grad():
        feats = [features[f] for f in heads.box_in_features]
        return heads.box_predictor(
            heads.box_head(heads.box_pooler(feats, [c.proposal_boxes for c in cands]))
        )


@pytest.mark.parametrize(
    "loss_type,sigmoid",
    [
        ("smooth_l1", False),
        ("giou", False),
        ("diou", False),
        ("ciou", False),
        ("balanced_l1", False),  # LibraGHM's types (libraghm/losses), with non-default params
        ("ghm_r", False),
        ("smooth_l1", True),
    ],
)
def test_per_roi_losses_sum_to_box_predictor_losses(loss_type, sigmoid):
    """Per-RoI ranking losses are the summands of the box head's own (mean-over-R) losses."""
    cfg = make_cfg(
        **{
            "MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE": loss_type,
            "MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE": sigmoid,
            "MODEL.ROI_BOX_HEAD.SMOOTH_L1_BETA": 0.3,
            "MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_WEIGHT": 2.0,
            "MODEL.BALANCED_L1.BETA": 0.5,
            "MODEL.BALANCED_L1.ALPHA": 0.3,
            "MODEL.GHM_R.MU": 0.05,
        }
    )
    heads = build(cfg).roi_heads
    assert isinstance(heads.box_predictor, LibraGHMFastRCNNOutputLayers)
    assert heads.box_predictor.box_regression_loss.name == loss_type
    sharpen_predictor(heads)
    proposals, targets = make_roi_inputs(num_gts=(2, 0))  # second image: no GT
    features = random_features(2)
    cands = candidates_of(heads, proposals, targets)
    preds = box_head_predictions(heads, features, cands)
    per_roi = heads.box_predictor.per_roi_losses(preds, cands, with_box_reg=True)
    # GHM-R's weights depend on its moving average; evaluation mode reads it without updating it
    # (as the read-only pass does), so both see the same statistics.
    heads.box_predictor.box_regression_loss.train(loss_type != "ghm_r")
    with torch.no_grad(), EventStorage():
        stock = heads.box_predictor.losses(preds, cands)
    r = sum(len(c) for c in cands)
    assert torch.allclose(per_roi["loss_cls"].sum() / r, stock["loss_cls"], rtol=1e-5, atol=1e-7)
    # Box losses are divided by R, except GHM-R's, which normalises itself (per_box shares sum
    # to its loss).
    norm = 1 if loss_type == "ghm_r" else r
    assert torch.allclose(
        per_roi["loss_box_reg"].sum() / norm, stock["loss_box_reg"], rtol=1e-5, atol=1e-7
    )
    assert float(stock["loss_box_reg"]) > 0
    bg = torch.cat([c.gt_classes for c in cands]) == NUM_CLASSES
    assert bool((per_roi["loss_box_reg"][bg] == 0).all())
    assert bool((per_roi["loss_box_reg"][~bg] > 0).all())
    # with_box_reg=False (mmdet mode): same classification losses, no box loss.
    cls_only = heads.box_predictor.per_roi_losses(preds, cands, with_box_reg=False)
    assert torch.equal(cls_only["loss_cls"], per_roi["loss_cls"])
    assert bool((cls_only["loss_box_reg"] == 0).all())


def ref_ghm_r_per_box(pred, target, mu, bins, loss_weight):
    """GHM-R shares of every box with fresh statistics (the batch histogram), written out."""
    d = pred.double() - target.double()  # (P, 4)
    g = d.abs() / torch.sqrt(d * d + mu * mu)
    idx = (g * bins).long().clamp(max=bins - 1)
    counts = torch.bincount(idx.flatten(), minlength=bins).double()
    n = d.numel()
    beta = n / (bins * counts[idx])  # N / (M * S_b) of every coordinate's bin
    asl1 = torch.sqrt(d * d + mu * mu) - mu
    return (asl1 * beta / n).sum(dim=1) * loss_weight


@pytest.mark.parametrize("loss_type", ["balanced_l1", "ghm_r"])
def test_ohem_ranks_with_the_box_heads_own_loss(loss_type):
    """OHEM with balanced L1 / GHM-R box losses: the per-RoI box losses are the head's loss
    object's ``per_box`` (checked against the closed form), the selection follows them, and the
    read-only pass leaves GHM-R's statistics alone (only the training loss updates them)."""
    cfg = make_cfg(
        **{
            "MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE": loss_type,
            "MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_WEIGHT": 1.5,
            "MODEL.BALANCED_L1.ALPHA": 0.3,
            "MODEL.BALANCED_L1.BETA": 0.5,
            "MODEL.GHM_R.MU": 0.05,
            "MODEL.GHM_R.BINS": 7,
            "MODEL.ROI_HEADS.OHEM.NMS_THRESH": 0.6,
        }
    )
    heads = build(cfg).roi_heads
    predictor = heads.box_predictor
    loss = predictor.box_regression_loss
    assert isinstance(heads.sampler, OHEMSampler) and heads.sampler.mode == "paper"
    if loss_type == "balanced_l1":
        assert isinstance(loss, BalancedL1Loss)
        assert loss.params == dict(alpha=0.3, gamma=1.5, beta=0.5, mmdet_compat=False)
    else:
        assert isinstance(loss, GHMR) and (loss.mu, loss.bins) == (0.05, 7)
        assert loss.acc_count.abs().sum() == 0 and int(loss.num_updates.sum()) == 0
    sharpen_predictor(heads)
    proposals, targets = make_roi_inputs(num_gts=(3, 2))
    features = random_features(2)
    cands = candidates_of(heads, proposals, targets)
    preds = box_head_predictions(heads, features, cands)
    per_roi = predictor.per_roi_losses(preds, cands, with_box_reg=True)

    labels = cat([c.gt_classes for c in cands])
    fg = torch.nonzero(labels < NUM_CLASSES).squeeze(1)
    boxes = cat([c.proposal_boxes.tensor for c in cands])[fg]
    gt = cat([c.gt_boxes.tensor for c in cands])[fg]
    deltas = preds[1].view(-1, NUM_CLASSES, 4)[fg, labels[fg]]
    transform = predictor.box2box_transform
    want = loss.per_box(boxes, gt, deltas, transform) * 1.5
    assert torch.allclose(per_roi["loss_box_reg"][fg], want, rtol=1e-6, atol=1e-7)
    # ... and per_box is the loss's closed form.
    target = transform.get_deltas(boxes, gt)
    if loss_type == "balanced_l1":
        closed = balanced_l1_loss(deltas, target, alpha=0.3, gamma=1.5, beta=0.5).sum(dim=1)
    else:
        closed = ref_ghm_r_per_box(deltas, target, mu=0.05, bins=7, loss_weight=10.0)
    assert torch.allclose(want, closed.float() * 1.5, rtol=1e-4, atol=1e-6)

    # The selection ranks by exactly these losses (classification + box).
    total = per_roi["loss_cls"] + per_roi["loss_box_reg"]
    if loss_type == "ghm_r":
        state = [loss.acc_count.clone(), loss.num_updates.clone()]
    got = heads.hard_example_indices(features, cands)
    offset = 0
    for i, cand in enumerate(cands):
        mine = total[offset : offset + len(cand)].tolist()
        assert min_loss_gap(mine) > 1e-5
        want_sel, _ = ref_select_paper(mine, cand.proposal_boxes.tensor.tolist(), 16, 0.6)
        assert got[i].tolist() == want_sel
        offset += len(cand)
    if loss_type == "balanced_l1":
        return
    # GHM-R: per_roi_losses and hard_example_indices read the statistics without updating them.
    assert torch.equal(loss.acc_count, state[0]) and torch.equal(loss.num_updates, state[1])
    assert int(loss.num_updates.sum()) == 0
    # In a training forward, the read-only pass updates nothing and the training loss once.
    after_selection = {}
    select = heads.hard_example_indices

    def spy(features, candidates):
        out = select(features, candidates)
        after_selection["state"] = (loss.acc_count.clone(), loss.num_updates.clone())
        return out

    heads.hard_example_indices = spy
    # (Every NMS survivor is kept, so that foreground RoIs train: GHM-R's per-RoI shares are
    # normalised by the whole batch and small next to the classification losses.)
    heads.batch_size_per_image = 512
    with EventStorage():
        selected, losses = heads(None, features, proposals, targets)
    assert int(after_selection["state"][1].sum()) == 0
    assert float(after_selection["state"][0].abs().sum()) == 0
    assert int(loss.num_updates.max()) == 1  # one update, from the training loss
    num_fg = sum(int((s.gt_classes < NUM_CLASSES).sum()) for s in selected)
    assert num_fg > 0
    # the moving average counted the 4 coordinates of every selected foreground RoI once
    assert float(loss.acc_count.sum()) == pytest.approx((1 - loss.momentum) * 4 * num_fg)
    assert torch.isfinite(losses["loss_box_reg"]) and float(losses["loss_box_reg"]) > 0


# ------------------------------------------------------------------------------------------------
# NMS and quotas on hand-made inputs.
# ------------------------------------------------------------------------------------------------
def test_paper_nms_removes_duplicates_within_image_only():
    a = [0.0, 0.0, 10.0, 10.0]
    boxes = torch.tensor(
        [
            a,  # 0: loss 10
            [0.0, 0.0, 10.0, 11.0],  # 1: IoU 0.909 with a, loss 9 -> suppressed
            [1.0, 0.0, 11.0, 10.0],  # 2: IoU 0.818 with a, loss 8 -> suppressed
            [0.0, 0.0, 10.0, 15.0],  # 3: IoU 0.667 with a, loss 7 -> kept at 0.7
            [50.0, 50.0, 60.0, 60.0],  # 4: loss 1
            [80.0, 80.0, 90.0, 90.0],  # 5: loss 0.5
            a,  # 6: image 1, same box as 0, loss 5: not suppressed by image 0
            [0.0, 0.0, 10.0, 11.0],  # 7: image 1, duplicate of 6, loss 4 -> suppressed
            [30.0, 30.0, 40.0, 40.0],  # 8: image 1, loss 0.1
        ]
    )
    losses = torch.tensor([10.0, 9.0, 8.0, 7.0, 1.0, 0.5, 5.0, 4.0, 0.1])
    ids = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 1])
    keep = ohem_select_paper(losses, boxes, ids, 2, 3, 0.7)
    assert keep.tolist() == [0, 3, 4, 6, 8]
    keep = ohem_select_paper(losses, boxes, ids, 2, 3, 0.65)  # now 3 overlaps a by > 0.65
    assert keep.tolist() == [0, 4, 5, 6, 8]
    keep = ohem_select_paper(losses, boxes, ids, 2, 3, 1.0)  # NMS off: pure top-3 per image
    assert keep.tolist() == [0, 1, 2, 6, 7, 8]


def test_paper_nms_on_duplicate_proposals_in_model():
    """Copies of the hardest RoI have the same loss: NMS keeps one of them, no NMS keeps all."""
    selected = {}
    for thresh in (0.7, 1.0):
        heads = build(make_cfg(**{"MODEL.ROI_HEADS.OHEM.NMS_THRESH": thresh})).roi_heads
        sharpen_predictor(heads)
        proposals, targets = make_roi_inputs(num_gts=(3, 2))
        features = random_features(2)
        cands = candidates_of(heads, proposals, targets)
        top = heads.hard_example_indices(features, cands)[0][0]
        hard_box = cands[0].proposal_boxes.tensor[top]
        # Add 5 exact copies of the hardest candidate to image 0 (they are not GT: appended
        # after the proposals, matched like any proposal).
        p0 = proposals[0]
        proposals[0] = make_proposals(torch.cat([p0.proposal_boxes.tensor, hard_box.repeat(5, 1)]))
        cands = candidates_of(heads, proposals, targets)
        idx = heads.hard_example_indices(features, cands)[0]
        boxes = cands[0].proposal_boxes.tensor[idx]
        copies = int((boxes == hard_box).all(dim=1).sum())
        selected[thresh] = copies
    assert selected[0.7] == 1
    assert selected[1.0] == 6


def test_mmdet_quota_on_hand_made_losses():
    g = torch.Generator().manual_seed(0)
    # image 0: 30 pos / 100 neg; image 1: 3 pos / 100 neg; image 2: nothing; image 3: 50 pos / 5 neg
    spec = [(30, 100), (3, 100), (0, 0), (50, 5)]
    labels, ids = [], []
    for i, (p, n) in enumerate(spec):
        labels += [int(torch.randint(NUM_CLASSES, (1,), generator=g))] * p + [NUM_CLASSES] * n
        ids += [i] * (p + n)
    labels, ids = torch.tensor(labels), torch.tensor(ids)
    losses = torch.rand(len(labels), generator=g)
    keep = ohem_select_mmdet(losses, labels, ids, 4, 32, 0.25, NUM_CLASSES)
    for i, (p, n) in enumerate(spec):
        mine = keep[ids[keep] == i]
        is_pos = labels[mine] < NUM_CLASSES
        want_pos = min(p, 8)
        want_neg = min(n, 32 - want_pos)
        assert int(is_pos.sum()) == want_pos and int((~is_pos).sum()) == want_neg
        cand = torch.nonzero(ids == i).squeeze(1)
        for sel, part in (
            (mine[is_pos], labels[cand] < NUM_CLASSES),
            (mine[~is_pos], labels[cand] == NUM_CLASSES),
        ):
            pool = cand[part]
            want = pool[torch.argsort(losses[pool], descending=True)[: len(sel)]]
            assert sorted(sel.tolist()) == sorted(want.tolist())
    # paper mode on the same input ignores labels: the top 32 per image
    keep = ohem_select_paper(losses, torch.zeros(len(losses), 4), ids, 4, 32, 1.0)
    for i, (p, n) in enumerate(spec):
        cand = torch.nonzero(ids == i).squeeze(1)
        want = cand[torch.argsort(losses[cand], descending=True)[:32]]
        assert sorted(keep[ids[keep] == i].tolist()) == sorted(want.tolist())


# ------------------------------------------------------------------------------------------------
# Training steps, gradients, one batched read-only pass.
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "mode,mask_on", [("paper", False), ("mmdet", False), ("paper", True), ("mmdet", True)]
)
def test_training_step_finite_and_one_batched_head_pass(mode, mask_on):
    cfg = make_cfg(**{"MODEL.ROI_HEADS.OHEM.MODE": mode, "MODEL.MASK_ON": mask_on})
    model = build(cfg)
    heads = model.roi_heads
    assert isinstance(heads, LibraGHMROIHeads) and isinstance(heads.sampler, OHEMSampler)
    assert heads.sampler.mode == mode
    calls = []
    heads.box_head.register_forward_hook(
        lambda m, inp, out: calls.append((inp[0].shape[0], out.requires_grad))
    )
    mask_calls = []
    if mask_on:
        heads.mask_head.register_forward_hook(lambda m, inp, out: mask_calls.append(inp[1]))
    captured = {}
    orig = heads.sample_hard_examples

    def spy(features, candidates):
        out = orig(features, candidates)
        captured["candidates"], captured["selected"] = candidates, out
        return out

    heads.sample_hard_examples = spy
    batch = tiny_batch(3, H, W, with_gt=(True, False, True))  # middle image has no GT
    with EventStorage() as storage:
        losses = model(batch)
        total = sum(losses.values())
        total.backward()
        latest = storage.latest()
    assert all(torch.isfinite(v) for v in losses.values())
    expected = {"loss_cls", "loss_box_reg", "loss_rpn_cls", "loss_rpn_loc"}
    if mask_on:
        expected.add("loss_mask")
    assert set(losses) == expected
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert heads.box_predictor.cls_score.weight.grad.abs().sum() > 0

    cands, sel = captured["candidates"], captured["selected"]
    # exactly one read-only pass over all images' candidates, then one training pass
    assert calls == [(sum(len(c) for c in cands), False), (sum(len(s) for s in sel), True)]
    assert all(len(s) <= 16 for s in sel) and sum(len(s) for s in sel) < sum(len(c) for c in cands)
    num_fg = [int((s.gt_classes < NUM_CLASSES).sum()) for s in sel]
    assert num_fg[1] == 0  # image without GT: only background
    if mode == "mmdet":
        assert all(f <= 4 for f in num_fg)
    if mask_on:  # the mask head trains on exactly the OHEM-selected foreground RoIs
        assert len(mask_calls) == 1 and len(mask_calls[0]) == 3 and sum(num_fg) > 0
        for got, s in zip(mask_calls[0], sel):
            want = s[s.gt_classes < NUM_CLASSES]
            assert torch.equal(got.proposal_boxes.tensor, want.proposal_boxes.tensor)
            assert torch.equal(got.gt_classes, want.gt_classes)
        assert torch.isfinite(losses["loss_mask"]) and float(losses["loss_mask"]) > 0
    assert latest["roi_head/num_fg_samples"][0] == pytest.approx(sum(num_fg) / 3)


@pytest.mark.parametrize("mode", ["paper", "mmdet"])
def test_gradients_flow_only_through_selected_rois(mode):
    cfg = make_cfg(**{"MODEL.ROI_HEADS.OHEM.MODE": mode})
    heads = build(cfg).roi_heads
    sharpen_predictor(heads)
    proposals, targets = make_roi_inputs(num_gts=(3, 2))
    features = {k: v.requires_grad_() for k, v in random_features(2).items()}
    params = list(heads.box_head.parameters()) + list(heads.box_predictor.parameters())

    with EventStorage():
        selected, losses = heads(None, features, proposals, targets)
    total = losses["loss_cls"] + losses["loss_box_reg"]
    got = torch.autograd.grad(total, params + [features["p2"], features["p3"]])

    # reference: the stock box-head loss on the selected RoIs only
    feats = [features[f] for f in heads.box_in_features]
    preds = heads.box_predictor(
        heads.box_head(heads.box_pooler(feats, [s.proposal_boxes for s in selected]))
    )
    with EventStorage():
        ref = heads.box_predictor.losses(preds, selected)
    want = torch.autograd.grad(
        ref["loss_cls"] + ref["loss_box_reg"], params + [features["p2"], features["p3"]]
    )
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-6)
    assert any(float(a.abs().sum()) > 0 for a in got[-2:])


# ------------------------------------------------------------------------------------------------
# Degenerate inputs.
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["paper", "mmdet"])
def test_degenerate_inputs(mode):
    cfg = make_cfg(
        **{
            "MODEL.ROI_HEADS.OHEM.MODE": mode,
            "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE": 512,
            "MODEL.ROI_HEADS.PROPOSAL_APPEND_GT": False,
        }
    )
    heads = build(cfg).roi_heads
    features = random_features(3)
    g = torch.Generator().manual_seed(3)
    targets = [make_targets(0, g), make_targets(2, g), make_targets(0, g)]
    far = torch.tensor([[150.0, 110.0, 158.0, 126.0], [140.0, 0.0, 158.0, 9.0]])
    targets[1].gt_boxes = Boxes(torch.tensor([[0.0, 0.0, 30.0, 30.0], [40.0, 40.0, 80.0, 90.0]]))
    proposals = [
        make_proposals(random_boxes(7, g)),  # no GT: all background, fewer than B
        make_proposals(far),  # GT but no positive proposal (no GT appended)
        make_proposals(torch.zeros(0, 4)),  # no GT and no proposal: no candidate at all
    ]
    with EventStorage():
        selected, losses = heads(None, features, proposals, targets)
    assert [len(s) for s in selected] == [7, 2, 0]
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    for p in heads.parameters():
        assert p.grad is None or torch.isfinite(p.grad).all()

    # every image empty
    empty = [make_proposals(torch.zeros(0, 4)) for _ in range(3)]
    with EventStorage():
        selected, losses = heads(None, features, empty, [make_targets(0, g) for _ in range(3)])
    assert [len(s) for s in selected] == [0, 0, 0]
    assert all(torch.isfinite(v) and float(v) == 0 for v in losses.values())


def test_ignored_rois_are_not_candidates():
    """With an ignore band (matcher label -1), those RoIs are dropped; all others are kept."""
    cfg = make_cfg(
        **{
            "MODEL.ROI_HEADS.IOU_THRESHOLDS": [0.4, 0.5],
            "MODEL.ROI_HEADS.IOU_LABELS": [0, -1, 1],
            "MODEL.ROI_HEADS.PROPOSAL_APPEND_GT": False,
        }
    )
    heads = build(cfg).roi_heads
    proposals, targets = make_roi_inputs(num_gts=(3,), num_jitter=60, seed=2)
    iou = pairwise_iou(targets[0].gt_boxes, proposals[0].proposal_boxes).max(dim=0)[0]
    ignored = (iou >= 0.4) & (iou < 0.5)
    assert 0 < int(ignored.sum()) < len(iou)
    cands = candidates_of(heads, proposals, targets)
    assert len(cands[0]) == len(iou) - int(ignored.sum())
    cand_iou = pairwise_iou(targets[0].gt_boxes, cands[0].proposal_boxes).max(dim=0)[0]
    assert bool(((cand_iou < 0.4) | (cand_iou >= 0.5)).all())
    assert torch.equal(cands[0].gt_classes == NUM_CLASSES, cand_iou < 0.4)
    with EventStorage():
        selected, losses = heads(None, random_features(1), proposals, targets)
    assert all(torch.isfinite(v) for v in losses.values())


def test_fewer_candidates_than_b_keeps_nms_survivors():
    cfg = make_cfg(**{"MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE": 512})
    heads = build(cfg).roi_heads
    proposals, targets = make_roi_inputs(num_gts=(2,), num_random=10, num_jitter=10)
    features = random_features(1)
    cands = candidates_of(heads, proposals, targets)
    idx = heads.hard_example_indices(features, cands)[0]
    boxes = cands[0].proposal_boxes.tensor[idx].tolist()
    # no two kept RoIs overlap above the NMS IoU, and every dropped RoI overlaps a kept one
    assert all(ref_iou(a, b) <= 0.7 for i, a in enumerate(boxes) for b in boxes[i + 1 :])
    dropped = set(range(len(cands[0]))) - set(idx.tolist())
    all_boxes = cands[0].proposal_boxes.tensor.tolist()
    assert all(any(ref_iou(all_boxes[d], b) > 0.7 for b in boxes) for d in dropped)


# ------------------------------------------------------------------------------------------------
# The sampler on its own.
# ------------------------------------------------------------------------------------------------
def test_ohem_sampler_keeps_candidates_and_dispatches_by_mode():
    g = torch.Generator().manual_seed(5)
    labels = torch.tensor([NUM_CLASSES, 2, -1, NUM_CLASSES, 0, -1, 4, NUM_CLASSES])
    sampler = OHEMSampler()
    assert sampler.mines_hard_examples and not RandomSampler.mines_hard_examples
    # As a label sampler it keeps every labelled candidate (the choice comes later, by loss).
    idx = sampler.sample_proposals(labels, 2, 0.25, NUM_CLASSES)
    assert idx.tolist() == [0, 1, 3, 4, 6, 7]
    n = 60
    loss_cls, loss_reg = torch.rand(n, generator=g), torch.rand(n, generator=g)
    boxes = random_boxes(n, g)
    lab = torch.randint(NUM_CLASSES + 1, (n,), generator=g)
    ids = torch.randint(2, (n,), generator=g).sort().values
    args = (boxes, lab, ids, 2, 8, 0.25, NUM_CLASSES)
    paper = OHEMSampler("paper", 0.5).select_hard_examples(loss_cls, loss_reg, *args)
    assert torch.equal(paper, ohem_select_paper(loss_cls + loss_reg, boxes, ids, 2, 8, 0.5))
    mmdet = OHEMSampler("mmdet").select_hard_examples(loss_cls, loss_reg, *args)
    assert torch.equal(mmdet, ohem_select_mmdet(loss_cls, lab, ids, 2, 8, 0.25, NUM_CLASSES))
    assert OHEMSampler("paper").uses_box_loss and not OHEMSampler("mmdet").uses_box_loss


# ------------------------------------------------------------------------------------------------
# Config: build-time validation, old names, configs build, inference unchanged.
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "key,value,spec",
    [
        ("MODEL.ROI_HEADS.OHEM.MODE", "hard", OHEMSampler.PARAMS["mode"]),
        ("MODEL.ROI_HEADS.OHEM.MODE", "Paper", OHEMSampler.PARAMS["mode"]),
        ("MODEL.ROI_HEADS.OHEM.NMS_THRESH", 1.5, OHEMSampler.PARAMS["nms_thresh"]),
        ("MODEL.ROI_HEADS.OHEM.NMS_THRESH", -0.1, OHEMSampler.PARAMS["nms_thresh"]),
        ("MODEL.ROI_HEADS.OHEM.NMS_THRESH", float("nan"), OHEMSampler.PARAMS["nms_thresh"]),
        ("MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 0, SAMPLING_PARAMS["batch_size_per_image"]),
        ("MODEL.ROI_HEADS.POSITIVE_FRACTION", 1.5, SAMPLING_PARAMS["positive_fraction"]),
        ("MODEL.ROI_HEADS.SAMPLER", "HardSampler", None),
    ],
)
@pytest.mark.parametrize("mode", ["paper", "mmdet"])
def test_invalid_config_fails_at_build(key, value, spec, mode):
    cfg = make_cfg(**{"MODEL.ROI_HEADS.OHEM.MODE": mode})
    node, leaf = key.rsplit(".", 1)
    cfg_node(cfg, node)[leaf] = value
    assert spec is None or not spec.is_valid(value)  # the PARAMS table is the oracle
    with pytest.raises(ValueError) as e:
        build_model(cfg)
    msg = str(e.value)
    assert f"{key} = {value!r} is invalid" in msg, msg
    if spec is not None:
        assert spec.describe() in msg, msg
    else:
        assert "OHEMSampler" in msg and "RandomSampler" in msg, msg


def test_box_predictor_without_per_roi_losses_is_refused():
    """OHEM ranks RoIs by the box predictor's per-RoI losses: a predictor without them (the stock
    one) is refused when the heads are built, and so is a box-loss type LibraGHM does not know."""
    from detectron2.modeling.roi_heads import FastRCNNOutputLayers

    cfg = make_cfg()
    shapes = build(cfg).backbone.output_shape()
    kwargs = LibraGHMROIHeads.from_config(cfg, shapes)
    assert isinstance(kwargs["sampler"], OHEMSampler)
    bp = kwargs["box_predictor"]
    kwargs["box_predictor"] = FastRCNNOutputLayers(
        bp.cls_score.in_features,
        box2box_transform=bp.box2box_transform,
        num_classes=NUM_CLASSES,
        box_reg_loss_type="smooth_l1",
    )
    for mode in ("paper", "mmdet"):
        kwargs["sampler"] = OHEMSampler(mode)
        with pytest.raises(ValueError) as e:
            LibraGHMROIHeads(**kwargs)
        for w in ("OHEMSampler", "per_roi_losses", "LibraGHMFastRCNNOutputLayers"):
            assert w in str(e.value), str(e.value)
    kwargs["sampler"] = RandomSampler()  # samples by label only: any predictor will do
    LibraGHMROIHeads(**kwargs)

    cfg = make_cfg(**{"MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE": "l2"})
    with pytest.raises(ValueError) as e:
        build_model(cfg)
    for w in ("MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE", "'l2'", "smooth_l1", "balanced_l1", "ghm_r"):
        assert w in str(e.value), str(e.value)


@pytest.mark.parametrize("old", ["OHEMROIHeads", "LibraROIHeads"])
def test_old_head_names_fail_naming_the_replacement(old):
    cfg = make_cfg(**{"MODEL.ROI_HEADS.NAME": old})
    with pytest.raises(ValueError) as e:
        build_model(cfg)
    msg = str(e.value)
    for w in (repr(old), "LibraGHMROIHeads", "MODEL.ROI_HEADS.SAMPLER"):
        assert w in msg, msg
    if old == "OHEMROIHeads":
        assert "OHEMSampler" in msg and "MODEL.ROI_HEADS.OHEM.MODE" in msg, msg


@pytest.mark.parametrize("old,value", [("MODE", "mmdet"), ("NMS_THRESH", 0.5)])
def test_old_ohem_keys_fail_naming_the_new_key(old, value, tmp_path):
    cfg = get_cfg()
    add_libraghm_config(cfg)
    with pytest.raises(KeyError) as e:
        cfg.merge_from_list([f"LIBRAGHM.OHEM.{old}", value])
    for w in (f"LIBRAGHM.OHEM.{old}", f"MODEL.ROI_HEADS.OHEM.{old}", "OHEMSampler"):
        assert w in str(e.value), str(e.value)
    path = tmp_path / "old.yaml"
    path.write_text(f"LIBRAGHM:\n  OHEM:\n    {old}: {value}\n")
    with pytest.raises(KeyError) as e:
        cfg.merge_from_file(str(path))
    for w in ("LIBRAGHM.OHEM", "MODEL.ROI_HEADS.OHEM", "OHEMSampler"):
        assert w in str(e.value), str(e.value)


@pytest.mark.parametrize(
    "path,mode",
    [
        ("Shapes-Detection/ohem_faster_rcnn.yaml", "paper"),
        ("Shapes-Detection/ohem_mmdet_faster_rcnn.yaml", "mmdet"),
        ("COCO-Detection/ohem_faster_rcnn_R_50_FPN_1x.yaml", "paper"),
        ("COCO-Detection/ohem_mmdet_faster_rcnn_R_50_FPN_1x.yaml", "mmdet"),
    ],
)
def test_configs_build(path, mode):
    cfg = get_config(path, tiny=False)
    heads = build_model(cfg).roi_heads
    assert isinstance(heads, LibraGHMROIHeads) and isinstance(heads.box_predictor,
                                                             LibraGHMFastRCNNOutputLayers)
    assert isinstance(heads.sampler, OHEMSampler) and heads.sampler.mode == mode
    assert heads.sampler.nms_thresh == pytest.approx(0.7)


def test_inference_matches_standard_roi_heads():
    cfg = make_cfg()
    ohem = build(cfg)
    cfg_std = make_cfg(**{"MODEL.ROI_HEADS.NAME": "StandardROIHeads"})
    std = build(cfg_std, seed=1)
    std.load_state_dict(ohem.state_dict())
    ohem.eval(), std.eval()
    sharpen_predictor(ohem.roi_heads), sharpen_predictor(std.roi_heads)
    batch = [{"image": d["image"]} for d in tiny_batch(1, H, W)]
    with torch.no_grad():
        a, b = ohem(batch)[0]["instances"], std(batch)[0]["instances"]
    assert len(a) == len(b) > 0
    assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor)
    assert torch.equal(a.scores, b.scores)
