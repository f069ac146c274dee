"""Config keys every job shares; each family config starts from `base()`."""

import ml_collections

# Logical axis name -> mesh axes. Every logical name a model uses must appear here
# (a missing one would silently replicate; `train_jax.sharding` refuses it instead).
# Default: FSDP over `fsdp`, tensor parallelism over `model`, batch over both data axes.
AXIS_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),       # model width (d_model), sharded FSDP-style
    ("mlp", "model"),        # feed-forward hidden
    ("heads", "model"),      # attention heads
    ("kv", None),            # per-head dim
    ("vocab", "model"),      # word / codebook / concept vocabularies
    ("classes", "model"),    # face identities (class-centre matrix)
    ("conv_in", None),       # conv kernels: input channels
    ("conv_out", "fsdp"),    # conv kernels: output channels
    ("norm", None),          # LayerNorm / BatchNorm scales and biases
    ("layers", None),        # the stacked axis of scanned layers (model.scan_layers)
)


def base() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.family = ""
  c.seed = 0
  # PRNG implementation of the train state's key (dropout, masks, negatives; read by
  # simla_jax/train.py, other families keep the seed key's threefry2x32):
  # threefry2x32 (JAX's default) | rbg | unsafe_rbg. The rbg family compiles much faster on
  # CPU (tiny SIMLA grad: 27.2 -> 16.8 CPU-s) and draws different, equally valid, numbers.
  c.rng_impl = "threefry2x32"
  c.batch_size = 8                 # global batch
  c.total_steps = 100
  c.log_every_steps = 10
  c.eval_every_steps = 50
  c.checkpoint_every_steps = 50
  c.keep_checkpoints = 2
  # A damaged newest checkpoint: True falls back to the newest intact one (the damaged one
  # is moved to <step>.damaged), False stops naming it.
  c.checkpoint_fallback = True
  # Resuming on another number of processes: "error", or "restart" the data iterators
  # (the model state is restored either way; each process's data position is its shard's).
  c.data_state_on_process_change = "error"
  # A SIGTERM / SIGINT the loop cannot act on within this many seconds (blocked in data,
  # compilation or evaluation) ends the run at once, as does a second signal.
  c.preemption_grace_s = 30.0
  c.progress_bar = True
  # A fresh run lowers and compiles its train step in a thread while it initialises the
  # state (train_jax/loop.py): start-up and the compile overlap on a CPU's cores.
  c.compile_ahead = True
  # Mesh sizes; -1 takes the devices left over. data*fsdp*model = #devices.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, model=1))
  c.axis_rules = AXIS_RULES
  c.optimizer = ml_collections.ConfigDict(dict(
      name="adamw",            # adamw | sgd
      lr=1e-4,
      weight_decay=0.0,
      b1=0.9, b2=0.999, eps=1e-8,   # adamw
      momentum=0.9, nesterov=False, # sgd
      # Params whose '/'-joined path matches any of these regexes get no weight decay.
      no_decay=(r".*bias$", r".*(scale|norm).*"),
      grad_clip_norm=0.0,      # 0 = off
      schedule=ml_collections.ConfigDict(dict(
          name="cosine",       # constant | cosine | polynomial | step
          warmup_steps=0,
          warmup_init_lr=0.0,
          end_lr=0.0,          # cosine / polynomial floor
          power=1.0,           # polynomial
          boundaries=(),       # step: step numbers where lr is multiplied by `decay`
          decay=0.1,
      )),
  ))
  return c
