"""Tests of OHEM in the ROI heads (libraghm/modeling/ohem_roi_heads.py).

The selection is checked against a separate, loop-based implementation (per-RoI losses written
out by hand, greedy NMS in Python), the gradients against a box-head loss computed on the
selected RoIs only, and tiny Faster/Mask R-CNN training steps end to end.
"""

import math

import pytest
import torch

from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances, pairwise_iou
from detectron2.utils.events import EventStorage

from conftest import get_config, tiny_batch
from libraghm.modeling.ohem_roi_heads import (
    OHEMROIHeads,
    ohem_select_mmdet,
    ohem_select_paper,
)

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
        **{"LIBRAGHM.OHEM.NMS_THRESH": nms_thresh, "MODEL.ROI_BOX_HEAD.SMOOTH_L1_BETA": beta}
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
        batched = heads.per_roi_losses(preds, cands)
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
    cfg = make_cfg(**{"LIBRAGHM.OHEM.MODE": "mmdet", "MODEL.ROI_HEADS.POSITIVE_FRACTION": 0.25})
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


@pytest.mark.parametrize(
    "loss_type,sigmoid",
    [
        ("smooth_l1", False),
        ("giou", False),
        ("ciou", False),
        ("balanced_l1", False),  # LibraGHM's type (libraghm/losses), with non-default params
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
            "LIBRAGHM.BALANCED_L1.BETA": 0.5,
            "LIBRAGHM.BALANCED_L1.ALPHA": 0.3,
        }
    )
    heads = build(cfg).roi_heads
    sharpen_predictor(heads)
    proposals, targets = make_roi_inputs(num_gts=(2, 0))  # second image: no GT
    features = random_features(2)
    cands = candidates_of(heads, proposals, targets)
    with torch.no_grad(), EventStorage():
        feats = [features[f] for f in heads.box_in_features]
        preds = heads.box_predictor(
            heads.box_head(heads.box_pooler(feats, [c.proposal_boxes for c in cands]))
        )
        per_roi = heads.per_roi_losses(preds, cands)
        stock = heads.box_predictor.losses(preds, cands)
    r = sum(len(c) for c in cands)
    for k in ("loss_cls", "loss_box_reg"):
        assert torch.allclose(per_roi[k].sum() / r, stock[k], rtol=1e-5, atol=1e-7), k
    assert float(stock["loss_box_reg"]) > 0
    bg = torch.cat([c.gt_classes for c in cands]) == NUM_CLASSES
    assert bool((per_roi["loss_box_reg"][bg] == 0).all())


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
        heads = build(make_cfg(**{"LIBRAGHM.OHEM.NMS_THRESH": thresh})).roi_heads
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
    cfg = make_cfg(**{"LIBRAGHM.OHEM.MODE": mode, "MODEL.MASK_ON": mask_on})
    model = build(cfg)
    heads = model.roi_heads
    calls = []
    heads.box_head.register_forward_hook(
        lambda m, inp, out: calls.append((inp[0].shape[0], out.requires_grad))
    )
    mask_calls = []
    if mask_on:
        heads.mask_head.register_forward_hook(
            lambda m, inp, out: mask_calls.append(sum(len(x) for x in inp[1]))
        )
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
    if mask_on:  # the mask head trains on the OHEM-selected foreground RoIs
        assert mask_calls == [sum(num_fg)]
    assert latest["roi_head/num_fg_samples"][0] == pytest.approx(sum(num_fg) / 3)


@pytest.mark.parametrize("mode", ["paper", "mmdet"])
def test_gradients_flow_only_through_selected_rois(mode):
    cfg = make_cfg(**{"LIBRAGHM.OHEM.MODE": mode})
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
            "LIBRAGHM.OHEM.MODE": mode,
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
# Config: build-time validation, configs build, inference unchanged.
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "key,value,words",
    [
        ("LIBRAGHM.OHEM.MODE", "hard", ["LIBRAGHM.OHEM.MODE", "'hard'", "paper", "mmdet"]),
        ("LIBRAGHM.OHEM.NMS_THRESH", 1.5, ["LIBRAGHM.OHEM.NMS_THRESH", "1.5", "[0, 1]"]),
        ("LIBRAGHM.OHEM.NMS_THRESH", -0.1, ["LIBRAGHM.OHEM.NMS_THRESH", "-0.1", "[0, 1]"]),
        (
            "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE",
            0,
            ["MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "positive"],
        ),
    ],
)
def test_invalid_config_fails_at_build(key, value, words):
    cfg = make_cfg(**{key: value})
    with pytest.raises(ValueError) as e:
        build_model(cfg)
    for w in words:
        assert w in str(e.value)


def test_box_reg_loss_without_per_roi_version_fails_at_build():
    """A box predictor whose loss type OHEM cannot rank by is refused when the heads are built."""
    from detectron2.modeling.roi_heads import FastRCNNOutputLayers

    cfg = make_cfg()
    shapes = build(cfg).backbone.output_shape()
    kwargs = OHEMROIHeads.from_config(cfg, shapes)
    bp = kwargs["box_predictor"]
    kwargs["box_predictor"] = FastRCNNOutputLayers(
        bp.cls_score.in_features,
        box2box_transform=bp.box2box_transform,
        num_classes=NUM_CLASSES,
        box_reg_loss_type="l2",
    )
    with pytest.raises(ValueError) as e:
        OHEMROIHeads(**kwargs)
    for w in ("MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE", "'l2'", "smooth_l1", "balanced_l1"):
        assert w in str(e.value)
    kwargs["ohem_mode"] = "mmdet"  # ranks by classification loss only: fine
    OHEMROIHeads(**kwargs)


def test_invalid_positive_fraction_in_mmdet_mode():
    cfg = make_cfg(**{"LIBRAGHM.OHEM.MODE": "mmdet", "MODEL.ROI_HEADS.POSITIVE_FRACTION": 1.5})
    with pytest.raises(ValueError, match=r"MODEL.ROI_HEADS.POSITIVE_FRACTION.*\[0, 1\]"):
        build_model(cfg)


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
    assert isinstance(heads, OHEMROIHeads) and heads.ohem_mode == mode
    assert heads.ohem_nms_thresh == pytest.approx(0.7)


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
