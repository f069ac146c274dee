"""What the SIMLA fine-tuning tasks share: a split read in order in fixed-size batches, a
jitted forward run over it, which splits an evaluation at a given step scores, writing
a checkpoint's scores, and the config checks."""

from typing import Any, Callable, Iterator, Mapping, Sequence

import grain
import jax
import numpy as np

from train_jax import metrics as metrics_lib


def batches(source, transform, batch_size: int, threads: int) -> Iterator[dict[str, Any]]:
  """`transform(k, source[k])` in source order, in batches of `batch_size` (the last one
  may be shorter)."""
  ds = grain.MapDataset.source(source).map_with_index(transform)
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                            prefetch_buffer_size=2 * batch_size))
  return iter(ds.batch(batch_size, drop_remainder=False))


def padded(batch: Mapping[str, np.ndarray], size: int,
           keys: Sequence[str]) -> tuple[dict[str, np.ndarray], int]:
  """(the `keys` of `batch`, each with its last row repeated up to `size` rows, the number
  of real rows): a short last batch keeps the one compiled shape."""
  n = len(batch[keys[0]])
  return {k: np.concatenate([batch[k], np.repeat(batch[k][-1:], size - n, 0)])
          for k in keys}, n


def predict(fn: Callable[..., Any], split: Iterator[Mapping[str, np.ndarray]], size: int,
            keys: Sequence[str]) -> Iterator[tuple[Mapping[str, np.ndarray], Any]]:
  """(batch, `fn(*its keys)` as numpy without the padding rows) per batch of `split`; every
  call sees `size` rows (see `padded`); `fn`'s outputs lead with the batch axis."""
  for b in split:
    inputs, n = padded(b, size, keys)
    yield b, jax.tree.map(lambda y: np.asarray(y)[:n], fn(*(inputs[k] for k in keys)))


def accuracies(split: str, pred: np.ndarray, label: np.ndarray, kind: np.ndarray,
               kinds: Sequence[str], majority: int) -> dict[str, float]:
  """In percent: `<split>_acc`; `<split>_acc_<name>` of each kind present (`kind` holds
  indices into `kinds`, -1 for none); `<split>_majority_acc`, of always answering
  `majority`."""
  hit = pred == label
  out = {f"{split}_acc": 100.0 * float(np.mean(hit))}
  for k, name in enumerate(kinds):
    if np.any(kind == k):
      out[f"{split}_acc_{name}"] = 100.0 * float(np.mean(hit[kind == k]))
  out[f"{split}_majority_acc"] = 100.0 * float(np.mean(label == majority))
  return out


def schedule(config) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """(`eval.splits`, the `eval.final_splits` not among them)."""
  splits = tuple(config.eval.splits)
  return splits, tuple(s for s in config.eval.final_splits if s not in splits)


def splits_at(config, step) -> tuple[str, ...]:
  """The splits scored at train step `step`: model selection reads `eval.splits` only; the
  final splits are scored once, at the end (`total_steps`)."""
  splits, final = schedule(config)
  return splits + final if int(step) >= int(config.total_steps) else splits


def write_scores(workdir: str, step: int, scores: Mapping[str, float]) -> str:
  """`scores` as `eval/<name>` at `step` in the workdir's metrics.jsonl (written by the main
  process); returns its path."""
  writer = metrics_lib.MetricWriter(workdir, tensorboard=False,
                                    is_main=jax.process_index() == 0)
  writer.write(step, {f"eval/{k}": v for k, v in scores.items()})
  writer.close()
  return writer.path


def check_config(config) -> None:
  """The global batch divides over the processes; a distillation `alpha` lies in [0, 1]."""
  if config.batch_size % jax.process_count():
    raise ValueError(f"batch_size {config.batch_size} must divide over "
                     f"{jax.process_count()} processes")
  if not 0.0 <= float(config.get("alpha", 0.0)) <= 1.0:
    raise ValueError(f"alpha {config.alpha} must be in [0, 1]")
