"""SIMLA weakly-supervised referring-expression grounding (the official Grounding.py).

  python run.py --config=configs/simla_grounding.py                 # shapes world
  python run.py --config=configs/simla_grounding.py:refcoco --config.init.checkpoint=CKPT ...

Fine-tuning: the retrieval model and step (`simla_jax.tasks.retrieval`: ITC with every
expression of the same image a positive, momentum distillation, queues; ITM with
negatives of other images) on (image, referring expression) pairs, the image as the id;
boxes are never seen (weak supervision).

Evaluation: each expression's Grad-CAM map (`simla_jax.gradcam`, `grounding.mode` itm:
cross-attention of BERT layer `grounding.layer`; itc: ViT self-attention of block
`grounding.itc_block`) is upsampled bicubically to the original image, each proposal
scored by sum(map in box) / area^alpha, and the best one counts as correct when its IoU
with the ground truth is >= 0.5. Reported per split (shapes: val / test; RefCOCO+:
val / testA / testB from the refs), in percent:
  <split>_acc          the `grounding.mode` Grad-CAM
  <split>_itc_acc      the itc mode (`grounding.also_itc`)
  <split>_largest_acc  the largest proposal (baseline)
  <split>_random_acc   a uniformly random proposal (baseline; its expected accuracy)
  <split>_acc_<kind>   shapes: by expression kind (attributes / position / relation)
  <split>_coco_acc     RefCOCO+ with `coco_file`: the ground-truth COCO boxes as proposals
  <split>_<mode><k>_acc  with `grounding.all_layers`: every BERT layer k (itm; ALBEF: its
                       fusion layers only, the text layers have no cross-attention) and
                       ViT block k (itc), all from the same pass (layer selection on val)
At the end `grounding.heatmaps` test examples are drawn to <workdir>/heatmaps/.
`config.eval_only=True` scores `init.checkpoint` without fine-tuning (`evaluate_checkpoint`).
"""

import collections
import os
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from simla_jax import gradcam
from simla_jax import train as simla_train
from simla_jax.data import augment
from simla_jax.data import grounding_shapes
from simla_jax.data import pipeline
from simla_jax.data import refcoco
from simla_jax.data.tokenizer import Tokenizer, pre_caption
from simla_jax.models import SIMLA
from simla_jax.tasks import finetune
from simla_jax.tasks import retrieval as rt
from train_jax import optimizers
from train_jax.task import Task

IOU_THRESHOLD = 0.5


# --------------------------------------------------------------------------- data
def train_source(config):
  d = config.data
  if d.name == "shapes":
    return grounding_shapes.GroundingShapesPairs(d, int(config.train_images))
  if d.name == "refcoco":
    r = d.refcoco
    if not r.train_file:
      raise ValueError("data.refcoco.train_file: the official refcoco+_train.json is required")
    return refcoco.RefcocoTrain(r.train_file, r.image_root, check_images=bool(r.check_images))
  raise ValueError(f"data.name: {d.name!r} is not a grounding dataset (shapes | refcoco)")


def eval_source(config, name: str):
  """The records of eval file / shapes split `name` (val / test)."""
  d = config.data
  if d.name == "shapes":
    return grounding_shapes.GroundingShapes(d, name)
  r = d.refcoco
  path = r.eval_files.get(name, "")
  if not path:
    raise ValueError(f"data.refcoco.eval_files.{name}: the official refcoco+_{name}.json "
                     f"is required")
  for key in ("refer_dir", "det_file"):
    if not r[key]:
      raise ValueError(f"data.refcoco.{key} is required for evaluation")
  return refcoco.RefcocoEval(path, r.image_root, refcoco.read_refer(r.refer_dir), r.det_file,
                             r.coco_file, check_images=bool(r.check_images))


def train_data_config(config) -> ml_collections.ConfigDict:
  """The pipeline reads RefCOCO+ training records as caption data (image, one caption)."""
  d = ml_collections.ConfigDict(config.data.to_dict())
  if d.name == "refcoco":
    d.name = "captions"
  return d


# --------------------------------------------------------------------------- evaluation
def proposal_accuracy(proposals: np.ndarray, truth: np.ndarray, pick: int) -> bool:
  return gradcam.iou_xywh(proposals[pick], truth) >= IOU_THRESHOLD


def random_box_hit_rate(proposals: np.ndarray, truth: np.ndarray) -> float:
  """Expected accuracy of a uniformly drawn proposal."""
  return float(np.mean([gradcam.iou_xywh(p, truth) >= IOU_THRESHOLD for p in proposals]))


def largest_box(proposals: np.ndarray) -> int:
  return int(np.argmax(proposals[:, 2] * proposals[:, 3]))


class Evaluator:
  """Grounding accuracy of eval sources (module doc lists the names it returns)."""

  def __init__(self, config, model: SIMLA, tokenizer: Tokenizer,
               sources: Mapping[str, Any]):
    g = config.grounding
    if g.mode not in gradcam.MODES:
      raise ValueError(f"grounding.mode {g.mode!r}: expected one of {gradcam.MODES}")
    self.sources = dict(sources)
    self.alpha = float(g.alpha)
    self.batch_size = int(config.eval.batch_size)
    self.tokenizer = tokenizer
    self.max_words = int(config.data.tokenizer.max_words)
    self.image_tf = augment.ImageTransform(config.data.aug, image_size=int(config.data.image_size),
                                           train=False)
    self.threads = int(config.data.loader.num_threads)
    self.all_layers = bool(g.all_layers)
    # The layers each mode has maps of: ALBEF's itm mode only its fusion layers.
    self.layers = {"itm": gradcam.cross_layers(model), "itc": range(model.config.vit.depth)}
    check = {"itm": lambda i, what: gradcam.check_itm_layer(model, i, what),
             "itc": lambda i, what: gradcam.check_layer(i, model.config.vit.depth, what)}
    # (metric prefix, mode, layer) scored; out-of-range layers fail here, before training.
    self.heads = [("", g.mode, check[g.mode](g.layer if g.mode == "itm" else g.itc_block,
                                             f"grounding.{g.mode} layer"))]
    if g.also_itc and g.mode != "itc":
      self.heads.append(("itc_", "itc", check["itc"](g.itc_block, "grounding.itc_block")))
    self.modes = sorted({mode for _, mode, _ in self.heads})
    if self.all_layers:
      self.modes = list(gradcam.MODES) if g.also_itc else [g.mode]
    # Every layer's maps from one forward and backward per mode: (layers, b, g, g).
    self._maps = {mode: jax.jit(
        lambda p, i, t, m, mode=mode: gradcam.gradcam(mode, model, p, i, t, m, None))
        for mode in self.modes}

  def _prepare(self, k: int, ex: dict) -> dict:
    ids, mask = self.tokenizer(pre_caption(ex["text"], self.max_words))
    image, _ = self.image_tf(ex["image"], None)
    return {"model_image": image, "text_ids": ids, "text_mask": mask, "index": np.int32(k)}

  def maps(self, params, name: str) -> list[tuple[int, dict[str, np.ndarray]]]:
    """(record index, {mode: the Grad-CAM maps (len(self.layers[mode]), g, g)}) of source
    `name`; `cam` picks one layer's."""
    out = []
    inputs = ("model_image", "text_ids", "text_mask")
    for b in finetune.batches(self.sources[name], self._prepare, self.batch_size, self.threads):
      x, n = finetune.padded(b, self.batch_size, inputs)
      per_mode = {mode: np.asarray(fn(params, *(x[k] for k in inputs)))[:, :n]
                  for mode, fn in self._maps.items()}
      out += [(k, {mode: m[:, j] for mode, m in per_mode.items()})
              for j, k in enumerate(b["index"].tolist())]
    return out

  def cam(self, cams: Mapping[str, np.ndarray], mode: str, layer: int) -> np.ndarray:
    """BERT layer / ViT block `layer`'s map (g, g) of one record's `maps`."""
    return cams[mode][self.layers[mode].index(layer)]

  def score(self, ex: Mapping[str, Any], cam: np.ndarray, boxes_key: str = "proposals"):
    """(pick, heat map over the original image) of example `ex` and map `cam` (g, g)."""
    h, w = ex.get("height", ex["image"].shape[0]), ex.get("width", ex["image"].shape[1])
    heat = gradcam.upsample(cam, h, w)
    return gradcam.best_box(heat, ex[boxes_key], self.alpha), heat

  def __call__(self, params, names: Sequence[str]) -> dict[str, float]:
    hits = collections.defaultdict(list)
    for name in names:
      source = self.sources[name]
      for index, cams in self.maps(params, name):
        ex = source[index]
        split, proposals, truth = ex["split"], ex["proposals"], ex["truth"]
        for prefix, mode, layer in self.heads:
          pick, heat = self.score(ex, self.cam(cams, mode, layer))
          hit = proposal_accuracy(proposals, truth, pick)
          hits[f"{split}_{prefix}acc"].append(hit)
          if prefix:
            continue
          if "kind" in ex:
            hits[f"{split}_acc_{ex['kind']}"].append(hit)
          if "coco_proposals" in ex:
            coco, _ = self.score(ex, self.cam(cams, mode, layer), "coco_proposals")
            hits[f"{split}_coco_acc"].append(proposal_accuracy(ex["coco_proposals"], truth,
                                                               coco))
        if self.all_layers:
          for mode in self.modes:
            for layer in self.layers[mode]:
              pick, _ = self.score(ex, self.cam(cams, mode, layer))
              hits[f"{split}_{mode}{layer}_acc"].append(proposal_accuracy(proposals, truth,
                                                                          pick))
        hits[f"{split}_largest_acc"].append(
            proposal_accuracy(proposals, truth, largest_box(proposals)))
        hits[f"{split}_random_acc"].append(random_box_hit_rate(proposals, truth))
    return {k: 100.0 * float(np.mean(v)) for k, v in sorted(hits.items())}

  def draw(self, params, name: str, count: int, directory: str) -> list[str]:
    """PNGs of the first `count` records of `name`: the image, its heat map, the ground
    truth (green) and the picked proposal (red)."""
    import matplotlib  # pylint: disable=import-outside-toplevel  # only when drawing
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import patches
    os.makedirs(directory, exist_ok=True)
    source = self.sources[name]
    _, mode, layer = self.heads[0]
    paths = []
    for index, cams in self.maps(params, name)[:count]:
      ex = source[index]
      pick, heat = self.score(ex, self.cam(cams, mode, layer))
      fig, ax = plt.subplots(figsize=(3.2, 3.6), dpi=100)
      ax.imshow(ex["image"])
      ax.imshow(heat, cmap="jet", alpha=0.45, extent=(0, heat.shape[1], heat.shape[0], 0))
      for box, colour in ((ex["truth"], "lime"), (ex["proposals"][pick], "red")):
        ax.add_patch(patches.Rectangle(box[:2], box[2], box[3], fill=False, edgecolor=colour,
                                       linewidth=1.5))
      ax.set_title(ex["text"], fontsize=7)
      ax.axis("off")
      path = os.path.join(directory, f"{name}_{index:04d}.png")
      fig.savefig(path, bbox_inches="tight")
      plt.close(fig)
      paths.append(path)
    return paths


# --------------------------------------------------------------------------- task
def make_task(config, mesh) -> Task:
  rt.check_config(config, mesh)
  tokenizer = pipeline.make_tokenizer(train_data_config(config))
  pretrained = rt.load_pretrained(config)
  model = rt.build_model(config, tokenizer, pretrained)
  tx, schedule = optimizers.make_optimizer(config.optimizer, config.total_steps)
  train_data = pipeline.make_train_iterator(
      train_data_config(config), batch_size=config.batch_size // jax.process_count(),
      tokenizer=tokenizer, source=train_source(config))
  splits, final = finetune.schedule(config)
  evaluator = Evaluator(config, model, tokenizer, {s: eval_source(config, s)
                                                   for s in splits + final})

  def evaluate(state):
    return evaluator(state.params, finetune.splits_at(config, jax.device_get(state.step)))

  def finish(state, workdir):
    count = int(config.grounding.heatmaps)
    if count and jax.process_index() == 0:
      evaluator.draw(state.params, (final or splits)[0], count,
                     os.path.join(workdir, "heatmaps"))

  return Task(init=rt.make_init(config, model, tx, pretrained),
              train_step=rt.make_train_step(config, model, tx, schedule,
                                            simla_train.batch_shards(config, mesh)),
              train_data=train_data, evaluate=evaluate, finish=finish,
              loss_keys=("loss",) + rt.LOSSES)


def evaluate_checkpoint(config, workdir: str) -> dict[str, float]:
  """`eval_only`: scores `init.checkpoint` as it is (no fine-tuning) on eval.splits and
  eval.final_splits; writes metrics.jsonl and heat maps."""
  tokenizer = pipeline.make_tokenizer(train_data_config(config))
  pretrained = rt.load_pretrained(config)
  model = rt.build_model(config, tokenizer, pretrained)
  params = jax.tree.map(jnp.asarray, pretrained.params)
  names = tuple(dict.fromkeys(tuple(config.eval.splits) + tuple(config.eval.final_splits)))
  evaluator = Evaluator(config, model, tokenizer, {s: eval_source(config, s) for s in names})
  scores = evaluator(params, names)
  path = finetune.write_scores(workdir, pretrained.step, scores)
  if jax.process_index() == 0:
    if int(config.grounding.heatmaps):
      evaluator.draw(params, names[-1], int(config.grounding.heatmaps),
                     os.path.join(workdir, "heatmaps"))
    print(", ".join(f"{k}={v:.4g}" for k, v in scores.items()))
    print(f"Evaluated {pretrained.source} (step {pretrained.step}). Metrics: {path}",
          flush=True)
  return scores
