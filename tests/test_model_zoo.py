"""The model zoo: configs by name, release files, the libraghm:// prefix, and MODEL_ZOO.md's table."""
import hashlib
import json
import os
import re
import sys

import pytest
import torch
import yaml
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import default_argument_parser
from detectron2.modeling import build_model

import train_net
from conftest import CONFIGS, REPO, get_config, tiny_train_opts
from libraghm import model_zoo
from libraghm.model_zoo.release import file_hash, release_checkpoint

sys.path.insert(0, os.path.join(REPO, "tools"))
import build_model_zoo  # noqa: E402

LIBRA = "Shapes-Detection/libra_faster_rcnn.yaml"


def test_config_files_by_name():
    assert model_zoo.get_config_file(LIBRA) == os.path.join(CONFIGS, LIBRA)
    assert model_zoo.get_config_file("Shapes-Detection/libra_faster_rcnn") == os.path.join(CONFIGS, LIBRA)
    cfg = model_zoo.get_config("COCO-Detection/libra_faster_rcnn_R_50_FPN_1x.yaml")
    assert cfg.MODEL.ROI_HEADS.NAME == "LibraGHMROIHeads"
    assert cfg.MODEL.ROI_HEADS.SAMPLER == "IoUBalancedSampler"
    assert cfg.MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE == "balanced_l1"
    with pytest.raises(RuntimeError, match="'Shapes-Detection/nope.yaml' is not a LibraGHM config"):
        model_zoo.get_config_file("Shapes-Detection/nope.yaml")
    with pytest.raises(RuntimeError, match="has no released checkpoint"):
        model_zoo.get_checkpoint_url("COCO-Detection/libra_faster_rcnn_R_50_FPN_1x.yaml")


def test_rows_cover_every_shapes_config():
    shapes = sorted(
        "Shapes-Detection/" + f for f in os.listdir(os.path.join(CONFIGS, "Shapes-Detection"))
        if f.endswith(".yaml") and not f.startswith("Base-")
    )
    assert sorted(n for n, _ in build_model_zoo.ROWS) == shapes
    for name, baseline in build_model_zoo.ROWS:
        assert baseline is None or dict(build_model_zoo.ROWS)[baseline] is None, name


def test_released_libra_model_loads_and_matches_its_file():
    """The committed release: hash in the name, weights only, loaded by get(trained=True)."""
    url = model_zoo.get_checkpoint_url(LIBRA)
    m = re.fullmatch(r"libraghm://Shapes-Detection/libra_faster_rcnn/model_final_([0-9a-f]{8})\.pth", url)
    assert m, url
    local = os.path.join(REPO, "model_zoo", url[len("libraghm://"):])
    assert hashlib.sha256(open(local, "rb").read()).hexdigest()[:8] == m.group(1)
    state = torch.load(local, map_location="cpu")
    assert set(state) == {"model", "__author__"}
    model = model_zoo.get(LIBRA, trained=True, device="cpu")
    assert not model.training
    # the redesigned model (LibraGHMROIHeads + IoU-balanced sampler + balanced L1, BFP) has exactly the
    # parameter and buffer names the release was trained with: no missing, no unexpected key
    from libraghm.losses import BalancedL1Loss
    from libraghm.modeling import LibraGHMROIHeads
    from libraghm.sampling import IoUBalancedSampler

    assert isinstance(model.roi_heads, LibraGHMROIHeads) and isinstance(model.roi_heads.sampler, IoUBalancedSampler)
    assert isinstance(model.roi_heads.box_predictor.box_regression_loss, BalancedL1Loss)
    assert _key_differences(model, state["model"]) == ([], [])
    for k, v in model.state_dict().items():
        assert torch.equal(v, state["model"][k]), k
    fresh = build_model(get_config(LIBRA))
    incompatible = fresh.load_state_dict(state["model"], strict=True)
    assert not incompatible.missing_keys and not incompatible.unexpected_keys
    # its metrics and MODEL_ZOO.md agree
    metrics = json.load(open(os.path.join(os.path.dirname(local), "metrics.json")))
    assert abs(metrics["bbox"]["AP"] - metrics["bbox_at_end_of_training"]["AP"]) <= 0.05
    row = [r for r in open(os.path.join(REPO, "MODEL_ZOO.md")) if r.startswith("| [libra_faster_rcnn]")]
    assert len(row) == 1 and f"| {metrics['bbox']['AP']:.1f} |" in row[0] and m.group(1) in row[0]


def _key_differences(model, state_dict):
    """(missing, unexpected): the model's state-dict keys absent from ``state_dict``, and the reverse."""
    have = set(model.state_dict())
    return sorted(have - set(state_dict)), sorted(set(state_dict) - have)


def test_model_zoo_table_matches_committed_metrics():
    text = open(os.path.join(REPO, "MODEL_ZOO.md")).read()
    for name, baseline in build_model_zoo.ROWS:
        m = build_model_zoo.load_metrics(name)
        if m is None:
            continue
        row = [r for r in text.splitlines() if r.startswith(f"| [{build_model_zoo._stem(name)}](")]
        assert len(row) == 1, name
        cells = [c.strip() for c in row[0].split("|")]
        assert float(cells[6]) == round(m["bbox"]["AP"], 1), name
        base = build_model_zoo.load_metrics(baseline) if baseline else None
        if base is not None:
            assert float(cells[7]) == pytest.approx(m["bbox"]["AP"] - base["bbox"]["AP"], abs=0.051)


def test_missing_release_file_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("LIBRAGHM_MODEL_ZOO", str(tmp_path))
    model = build_model(get_config(LIBRA))
    with pytest.raises(FileNotFoundError, match="build_model_zoo.py --only Shapes-Detection/libra_faster_rcnn"):
        DetectionCheckpointer(model).load(model_zoo.get_checkpoint_url(LIBRA))


def test_release_of_a_training_output_evaluates_back_to_the_same_ap(tmp_path, monkeypatch):
    """Train briefly, release, then train_net --eval-only on the release file reproduces the AP."""
    cfg_file = os.path.join(CONFIGS, LIBRA)
    out = tmp_path / "train"
    args = default_argument_parser().parse_args(["--config-file", cfg_file, *tiny_train_opts(out, 30)])
    cfg = train_net.setup(args)
    trainer = train_net.Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    evals = [json.loads(line) for line in open(out / "metrics.json") if "bbox/AP" in line]
    trained_ap = evals[-1]["bbox/AP"]  # COCOEvaluator at the end of training

    zoo = tmp_path / "zoo"
    release = release_checkpoint(str(out / "model_final.pth"), str(out / "config.yaml"), str(zoo / "mine"))
    assert os.path.basename(release) == f"model_final_{file_hash(release)}.pth"
    released = torch.load(release, map_location="cpu")
    assert set(released) == {"model", "__author__"}
    assert _key_differences(trainer.model, released["model"]) == ([], [])
    trained_state = trainer.model.state_dict()
    assert all(torch.equal(v, trained_state[k]) for k, v in released["model"].items())
    released_cfg = open(zoo / "mine" / "config.yaml").read()
    assert "WEIGHTS: ''" in released_cfg and str(out) not in released_cfg

    monkeypatch.setenv("LIBRAGHM_MODEL_ZOO", str(zoo))
    eval_args = default_argument_parser().parse_args([
        "--config-file", str(zoo / "mine" / "config.yaml"), "--eval-only",
        "MODEL.WEIGHTS", "libraghm://mine/" + os.path.basename(release), "OUTPUT_DIR", str(tmp_path / "eval"),
    ])
    res = train_net.main(eval_args)
    assert res["bbox"]["AP"] == pytest.approx(trained_ap, abs=1e-6)
    # not only the AP: the very same detections, box for box
    before = json.load(open(out / "inference" / "shapes_val_mini" / "coco_instances_results.json"))
    after = json.load(open(tmp_path / "eval" / "inference" / "shapes_val_mini" / "coco_instances_results.json"))
    assert len(before) > 0 and len(after) == len(before)
    for a, b in zip(before, after):
        assert a["image_id"] == b["image_id"] and a["category_id"] == b["category_id"]
        assert a["bbox"] == pytest.approx(b["bbox"], abs=1e-3) and a["score"] == pytest.approx(b["score"], abs=1e-5)


def test_release_of_a_config_with_old_keys_fails_naming_the_new_key(tmp_path):
    """A training output whose config.yaml still has LibraGHM 0.1's keys is not released (it could not be
    evaluated back): the error names the new key and no file is written."""
    model = build_model(get_config(LIBRA))
    ckpt = tmp_path / "model_final.pth"
    torch.save({"model": model.state_dict(), "iteration": 9}, ckpt)
    cfg = get_config(LIBRA)
    good = tmp_path / "config.yaml"
    good.write_text(cfg.dump())
    dumped = yaml.safe_load(cfg.dump())
    dumped["LIBRAGHM"]["GHMC"] = {"BINS": 30}  # as a LibraGHM 0.1 training wrote it
    old = tmp_path / "old_config.yaml"
    old.write_text(yaml.safe_dump(dumped))
    with pytest.raises(KeyError, match="LIBRAGHM.GHMC was renamed to MODEL.GHM_C"):
        release_checkpoint(str(ckpt), str(old), str(tmp_path / "rel_old"))
    assert not (tmp_path / "rel_old").exists()
    release = release_checkpoint(str(ckpt), str(good), str(tmp_path / "rel"))
    assert _key_differences(model, torch.load(release, map_location="cpu")["model"]) == ([], [])


def test_model_zoo_config_is_checked_for_parts_that_would_ignore_a_setting(tmp_path, monkeypatch):
    """model_zoo.get_config runs check_config: a LibraGHM sampler on Detectron2's StandardROIHeads fails."""
    (tmp_path / "Shapes-Detection").mkdir()
    bad = tmp_path / "Shapes-Detection" / "bad.yaml"
    bad.write_text(f'_BASE_: "{os.path.join(CONFIGS, "Shapes-Detection/faster_rcnn_small_R_FPN.yaml")}"\n'
                   "MODEL:\n  ROI_HEADS:\n    SAMPLER: IoUBalancedSampler\n")
    monkeypatch.setenv("LIBRAGHM_CONFIGS", str(tmp_path))
    needs = "MODEL.ROI_HEADS.SAMPLER = 'IoUBalancedSampler' needs LibraGHM's LibraGHMROIHeads"
    with pytest.raises(ValueError, match=needs):
        model_zoo.get_config("Shapes-Detection/bad.yaml")


def test_parse_evaluation_reads_detectron2_log():
    log = "\n".join([
        "[11/23 05:20:01 d2.evaluation.evaluator]: Total inference pure compute time: 0:00:22 (0.074700 s / iter per device, on 1 devices)",
        "[11/23 05:20:03 d2.evaluation.testing]: copypaste: Task: bbox",
        "[11/23 05:20:03 d2.evaluation.testing]: copypaste: AP,AP50,AP75,APs,APm,APl",
        "[11/23 05:20:03 d2.evaluation.testing]: copypaste: 53.9094,74.1038,63.6988,51.6551,58.7495,50.0361",
    ])
    ap, sec = build_model_zoo.parse_evaluation(log)
    assert ap == {"AP": 53.9094, "AP50": 74.1038, "AP75": 63.6988, "APs": 51.6551, "APm": 58.7495, "APl": 50.0361}
    assert sec == 0.0747
