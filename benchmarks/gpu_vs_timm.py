r"""vit_jax against timm on whatever accelerator is here: one script, one table.

  PYTHONPATH=. python benchmarks/gpu_vs_timm.py [--out DIR] [--budget_s 540]
  PYTHONPATH=. python benchmarks/gpu_vs_timm.py --smoke     # CPU, tiny shapes
  PYTHONPATH=. python benchmarks/gpu_vs_timm.py --stages=loop,rest   # some stages only

What it times, each case in its own subprocess (JAX preallocates GPU memory,
so the two frameworks never share a process; a worker is one of the
``worker_*`` functions below, run as ``python -c "import gpu_vs_timm as g;
g.worker_jax(...)"``), in this order, skipping what no longer fits `--budget_s`:

1. the bf16 matmul peak (8192^3, median of 10), the MFU denominator;
2. a probe of one attention layer at 197 and 577 tokens: the einsum path,
   and the cuDNN flash-attention kernel at each token padding
   (`vit.ATTENTION_PAD_MULTIPLE`): which pads the kernel accepts and how fast
   forward+backward runs (the fastest accepted pad is used for every later
   JAX case);
3. vit_jax's real train step (`benchmark.compile_step(train=True)`, i.e.
   `train_step.make_train_step` under the paper's fine-tuning recipe: SGD
   momentum, clipping, schedule) and inference, ViT-B/16, bf16 (and f32);
4. timm's ViT-B/16 of the same shape: eager with AMP bf16 (timm's fused
   SDPA attention), f32 with TF32 and `torch.compile`, the same SGD-momentum
   step (no clipping: timm users' plain loop);
5. the training loop itself (`python -m vit_jax.main`, `dataset=synthetic`)
   at the step's shape: its logged images/sec over the benchmark step's;
6. vit_jax's train steps again at the other token paddings
   (`STEP_PAD_CANDIDATES`): the pad also sets how many tokens the q/k/v
   and out projections run on (`vit.fused_attention`), so the attention
   probe alone cannot pick it;
7. a profile of the 224 and 384 train steps (`worker_profile`, CUDA-graph
   command buffers off so each op shows): device time per step by op class
   (matmul, attention, copies, fusions) and the top ops, with the optimised
   HLO written next to the results;
8. the block probes: ViT-B's attention layer, MLP and whole encoder block,
   fwd+bwd at 197 and 577 tokens, vit_jax's modules against timm's (eager;
   the block also compiled): which part the gap to timm is in;
9. the rest: ViT-L/16 and ViT-H/14 at 384 with per-block remat (peak memory
   of a 32- and a 16-image micro-batch step: what batch 512 through
   accumulation needs; `benchmarks/memory.py` estimates them without a GPU),
   the einsum attention at 384, f32, then the ablations two runs settled
   (einsum attention at 224, `XLA_FLAG_VARIANTS`).

MFU = images/sec x analytic FLOPs per image (matmuls and attention, 2 per
MAC, unpadded tokens; a train step counts 3x forward) / measured peak.
Prints `RESULT {json}` lines as it goes and the table last; everything also
goes to `--out` (results.jsonl, log.txt).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)  # this clone's vit_jax

# absl only: the GPU machine has no TensorFlow and no ml_collections.
from absl import flags  # noqa: E402

from vit_jax import cli  # noqa: E402

# (case, model, resolution, batch, train, dtype, variant). Timm rows use the
# same case names, so the table pairs them.
JAX_CASES = [
    ('B16-224-train-bf16', 'ViT-B_16', 224, 128, True, 'bfloat16', {}),
    ('B16-384-train-bf16', 'ViT-B_16', 384, 64, True, 'bfloat16', {}),
    ('B16-224-infer-bf16', 'ViT-B_16', 224, 256, False, 'bfloat16', {}),
]
TORCH_CASES = [  # (case, resolution, batch, train, dtype, compile)
    ('B16-224-train-bf16', 224, 128, True, 'bfloat16', False),
    ('B16-384-train-bf16', 384, 64, True, 'bfloat16', False),
    ('B16-224-infer-bf16', 224, 256, False, 'bfloat16', False),
    ('B16-224-train-bf16-compile', 224, 128, True, 'bfloat16', True),
    ('B16-224-train-f32', 224, 128, True, 'float32', False),
]
JAX_EXTRA = [   # The "rest" stage: settled ablations, f32, big-model memory.
    ('B16-224-train-bf16-einsum', 'ViT-B_16', 224, 128, True, 'bfloat16',
     {'attention': 'einsum'}),
    ('B16-384-train-bf16-einsum', 'ViT-B_16', 384, 64, True, 'bfloat16',
     {'attention': 'einsum'}),
    ('B16-224-train-f32', 'ViT-B_16', 224, 128, True, 'float32', {}),
    ('L16-384-train-bf16-remat', 'ViT-L_16', 384, 32, True, 'bfloat16',
     {'remat': 'dots_with_no_batch_dims_saveable'}),
    ('H14-384-train-bf16-remat', 'ViT-H_14', 384, 16, True, 'bfloat16',
     {'remat': 'dots_with_no_batch_dims_saveable'}),
]
# XLA GPU code generation not yet tried on the 224 train step (docs.jax.dev
# "GPU performance tips": Triton for any GEMM). Tried before, within run-to-run
# spread (benchmarks/RESULTS.md): --xla_gpu_enable_triton_gemm=false and
# --xla_gpu_enable_cublaslt=true.
XLA_FLAG_VARIANTS = ['--xla_gpu_triton_gemm_any=true', '--xla_gpu_enable_cudnn_layer_norm=true']
SMOKE_JAX = [('Ti16-32-train-f32', 'ViT-Ti_16', 32, 4, True, 'float32', {}),
             ('Ti16-32-infer-f32', 'ViT-Ti_16', 32, 8, False, 'float32', {})]
SMOKE_TORCH = [('Ti16-32-train-f32', 32, 4, True, 'float32', False)]
PAD_CANDIDATES = (1, 16, 64, 128)   # What the probe tries (the layer, projections included).
# The pad also sets the projections' token count (197 -> 208 or 256 tokens):
# the whole train steps at these (and the run's pad) say which is faster.
STEP_PAD_CANDIDATES = (16, 64)
SHAPES = {  # model -> (patch, width, mlp, layers, heads)
    'ViT-Ti_16': (16, 192, 768, 12, 3), 'ViT-B_16': (16, 768, 3072, 12, 12),
    'ViT-L_16': (16, 1024, 4096, 24, 16), 'ViT-H_14': (14, 1280, 5120, 32, 16)}
TIMM_ARCH = {'ViT-Ti_16': 'vit_tiny_patch16_224', 'ViT-B_16': 'vit_base_patch16_224'}


def forward_flops(model: str, res: int, classes: int = 1000) -> float:
  """Analytic forward FLOPs per image (2 per multiply-add; unpadded tokens)."""
  patch, d, mlp, layers, _ = SHAPES[model]
  n = (res // patch) ** 2
  t = n + 1
  per_layer = 2 * t * (4 * d * d + 2 * d * mlp) + 2 * 2 * t * t * d
  return layers * per_layer + 2 * n * patch * patch * 3 * d + 2 * d * classes


def emit(record: dict) -> None:
  print('RESULT ' + json.dumps(record), flush=True)


# ----------------------------------------------------------------------------
# Workers (each runs in its own process).
# ----------------------------------------------------------------------------

def worker_jax_peak(smoke: bool) -> None:
  import jax
  import jax.numpy as jnp
  from vit_jax import benchmark
  n = 512 if smoke else 8192
  k1, k2 = jax.random.split(jax.random.key(0))
  a = jax.random.normal(k1, (n, n), jnp.bfloat16)
  b = jax.random.normal(k2, (n, n), jnp.bfloat16)
  f = jax.jit(lambda a, b: a @ b)
  times = benchmark.time_calls(lambda: f(a, b), 10, warmup=3)
  dev = jax.devices()[0]
  emit(dict(framework='jax', case='peak-bf16-matmul', tflops=2 * n**3 / statistics.median(times)
            / 1e12, device=dev.device_kind, jax=jax.__version__))


def fwd_bwd_ms(apply: Callable, params, x) -> float:
  """Median ms of one forward+backward of apply(params, x) (the gradient of
  the sum of its squares, w.r.t. both), jitted: 20 timed calls after 2."""
  import jax
  import jax.numpy as jnp
  from vit_jax import benchmark

  def loss(params, x):
    return jnp.sum(apply(params, x).astype(jnp.float32) ** 2)
  f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  return 1e3 * statistics.median(benchmark.time_calls(lambda: f(params, x), 20, warmup=2))


def time_torch(fn: Callable, sync: Callable, repeats: int, warmup: int) -> list[float]:
  """Wall times (s) of `repeats` calls of fn after `warmup`, each synced."""
  for _ in range(warmup):
    fn()
  sync()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    sync()
    times.append(time.perf_counter() - start)
  return times


def worker_attention_probe(smoke: bool) -> None:
  """Forward+backward of one attention layer (the model's own module, its q/k/v
  and out projections included) at 197 and 577 tokens: the einsum path, and
  the cuDNN kernel at each token padding (which pads it accepts, how fast)."""
  import jax
  import jax.numpy as jnp
  from vit_jax.models import vit
  impl = 'xla' if smoke else 'cudnn'
  batch, heads, hd = (2, 2, 8) if smoke else (64, 12, 64)
  for t in (197, 577):
    x = jax.random.normal(jax.random.key(t), (batch, t, heads * hd), jnp.bfloat16)
    for multiple in ('einsum',) + PAD_CANDIDATES:
      einsum = multiple == 'einsum'
      layer = vit.MultiHeadDotProductAttention(
          num_heads=heads, dtype=jnp.bfloat16, attention='einsum' if einsum else impl)
      params = layer.init(jax.random.key(0), x, deterministic=True)
      rec = dict(framework='jax', case=f'attention-probe-T{t}-{multiple}', tokens=t,
                 pad_multiple=multiple, implementation='einsum' if einsum else impl)
      try:
        if not einsum:
          vit.ATTENTION_PAD_MULTIPLE = multiple
        rec['ms'] = fwd_bwd_ms(lambda p, x, layer=layer: layer.apply(p, x, deterministic=True),
                               params, x)
      except Exception as e:  # noqa: BLE001 - a refused shape is a finding
        rec['error'] = f'{type(e).__name__}: {e}'[:300]
      emit(rec)


def worker_jax(cases: list, repeats: int, pad_multiple: int, xla_flags: str = '') -> None:
  """Times `cases`; `xla_flags` are added to XLA_FLAGS (before JAX starts)."""
  if xla_flags:
    os.environ['XLA_FLAGS'] = f'{os.environ.get("XLA_FLAGS", "")} {xla_flags}'.strip()
  import jax
  from vit_jax import benchmark
  from vit_jax.models import vit
  vit.ATTENTION_PAD_MULTIPLE = pad_multiple
  label = ' '.join('+' + f.replace('--xla_gpu_', '') for f in xla_flags.split())
  for name, model_name, res, batch, train, dtype, variant in cases:
    t0 = time.time()
    rec = dict(framework='jax', case=f'{name} {label}'.strip(),
               model=model_name, res=res, batch=batch, train=train, dtype=dtype,
               variant=variant, pad_multiple=pad_multiple, xla_flags=xla_flags)
    try:
      # 'pad_multiple' in a variant overrides the run's padding for that case.
      vit.ATTENTION_PAD_MULTIPLE = variant.get('pad_multiple', pad_multiple)
      rec['pad_multiple'] = vit.ATTENTION_PAD_MULTIPLE
      model, variables = benchmark.build(
          model_name, num_classes=1000, resolution=res, dtype=dtype,
          **{k: v for k, v in variant.items() if k != 'pad_multiple'})
      # Where a case's wall time goes besides the step's compile (one run had
      # ~30 s per case outside it): the random init, compiled on the device.
      jax.block_until_ready(variables)
      rec['build_s'] = time.time() - t0
      r = benchmark.benchmark(model, variables, batch=batch, resolution=res, train=train,
                              repeats=repeats, name=name)
      rec.update(img_s=r.images_per_sec, compile_s=r.compile_s,
                 step_ms_min=1e3 * min(r.step_times), step_ms_max=1e3 * max(r.step_times))
      stats = jax.devices()[0].memory_stats() or {}
      if 'peak_bytes_in_use' in stats:
        rec['peak_mem_gb'] = stats['peak_bytes_in_use'] / 2**30
      del model, variables
    except Exception as e:  # noqa: BLE001 - report and go on
      rec['error'] = f'{type(e).__name__}: {e}'[:500]
    rec['wall_s'] = time.time() - t0
    emit(rec)


def worker_profile(cases: list, pad_multiple: int, out_dir: str, steps: int = 5) -> None:
  """Where a step's device time goes: `steps` steps of each case under
  `jax.profiler.trace`, device time summed per HLO op of the optimised
  program (the program is written to `out_dir`/<case>.hlo.txt.gz to read
  the fusions), one record per op class and per top op. CUDA-graph command
  buffers are turned off: inside one, the trace shows one op for the lot."""
  import gzip
  import tempfile
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             ' --xla_gpu_enable_command_buffer=').strip()
  import jax
  from vit_jax import benchmark
  from vit_jax.models import vit
  vit.ATTENTION_PAD_MULTIPLE = pad_multiple
  for name, model_name, res, batch, train, dtype, variant in cases:
    try:
      model, variables = benchmark.build(model_name, num_classes=1000, resolution=res,
                                         dtype=dtype, **variant)
      step = benchmark.compile_step(model, variables, batch=batch, resolution=res, train=train)
      benchmark.time_calls(step.call, 3, warmup=2)
      hlo = step.hlo()
      with gzip.open(os.path.join(out_dir, f'{name}.hlo.txt.gz'), 'wt') as f:
        f.write(hlo)
      logdir = tempfile.mkdtemp()
      with jax.profiler.trace(logdir, create_perfetto_trace=True):
        benchmark.time_calls(step.call, steps, warmup=0)
      trace = [os.path.join(root, f) for root, _, files in os.walk(logdir) for f in files
               if f == 'perfetto_trace.json.gz']
      if not trace:
        raise FileNotFoundError(f'no perfetto_trace.json.gz under {logdir}')
      for rec in op_profile(trace[0], hlo, steps):
        emit(dict(framework='profile', case=name, model=model_name, res=res, batch=batch,
                  **rec))
    except Exception as e:  # noqa: BLE001 - report and go on
      emit(dict(framework='profile', case=name, error=f'{type(e).__name__}: {e}'[:500]))


def hlo_ops(hlo: str) -> dict[str, str]:
  """Instruction name -> 'opcode kind/target shape' of optimised HLO text."""
  import re
  ops = {}
  for line in hlo.splitlines():
    # A tuple shape '(bf16[..]{..}, s8[..]{..})' has spaces: match it whole.
    m = re.match(r'\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\([^=]*?\)|\S+)\s+([\w\-]+)\(', line)
    if not m:
      continue
    name, shape, opcode = m.groups()
    extra = re.search(r'custom_call_target="([^"]+)"|kind=(\w+)', line)
    what = next((g for g in extra.groups() if g), '') if extra else ''
    ops[name] = f'{opcode} {what} {shape[:60]}'.replace('  ', ' ')
  return ops


def op_class(desc: str, kernel: str) -> str:
  """A coarse class of an op from its HLO description and kernel name."""
  text = f'{desc} {kernel}'.lower()
  if 'fmha' in text or 'flash' in text or 'dot_product_attention' in text:
    return 'attention'
  if any(k in text for k in ('gemm', 'cublas', 'matmul', 'xmma', 'nvjet', 'cutlass',
                             'triton_gemm', '__cudnn$conv')):
    return 'matmul'
  if 'transpose' in text or 'copy' in text:
    return 'copy/transpose'
  if 'kinput' in text or 'reduce' in text:
    return 'reduction fusion'
  if 'kloop' in text or 'fusion' in text:
    return 'elementwise fusion'
  return 'other'


def op_profile(trace_path: str, hlo: str, steps: int, top: int = 25) -> list[dict]:
  """Device time per step by op class and for the `top` ops, from a
  perfetto trace of `steps` steps: the events of the device processes
  (GPU/TPU streams; on CPU, XLA's thunk threads) that name an `hlo_op`."""
  import gzip
  with gzip.open(trace_path, 'rt') as f:
    events = json.load(f)['traceEvents']
  procs = {e['pid']: e['args']['name'] for e in events
           if e.get('ph') == 'M' and e.get('name') == 'process_name'}
  devices = {pid for pid, n in procs.items() if '/device:' in n}
  ops = hlo_ops(hlo)
  per_op: dict[str, list] = {}
  for e in events:
    args = e.get('args') or {}
    # On a device's streams every event is a kernel (named by its HLO op when
    # the trace says); elsewhere (CPU) only XLA's thunks name an hlo_op.
    if e.get('ph') != 'X' or (e['pid'] not in devices if devices else 'hlo_op' not in args):
      continue
    rec = per_op.setdefault(args.get('hlo_op', e['name']), [0.0, 0, {}])
    rec[0] += e.get('dur', 0.0)
    rec[1] += 1
    rec[2][e['name']] = rec[2].get(e['name'], 0.0) + e.get('dur', 0.0)
  total = sum(v[0] for v in per_op.values()) or 1.0
  classes: dict[str, float] = {}
  rows = []
  for op, (us, n, kernels) in per_op.items():
    kernel = max(kernels, key=kernels.get)   # The op's longest-running kernel.
    desc = ops.get(op, '')
    cls = op_class(desc, kernel)
    classes[cls] = classes.get(cls, 0.0) + us
    rows.append(dict(op=op, op_class=cls, ms_per_step=us / steps / 1e3, share=us / total,
                     launches_per_step=n / steps, hlo=desc, kernel=kernel[:80]))
  out = [dict(op='TOTAL device time', op_class='all', ms_per_step=total / steps / 1e3,
              share=1.0)]
  out += [dict(op=f'class {c}', op_class=c, ms_per_step=us / steps / 1e3, share=us / total)
          for c, us in sorted(classes.items(), key=lambda kv: -kv[1])]
  return out + sorted(rows, key=lambda r: -r['ms_per_step'])[:top]


# The run's stages, in order (module docstring; `--stages` picks some).
STAGES = ('peak', 'probe', 'steps', 'timm', 'loop', 'pads', 'profile', 'blocks', 'rest')
BLOCK_PARTS = ('attention', 'mlp', 'block')   # What the block probes time.


def _block_dims(smoke: bool) -> tuple[int, int, int, int]:
  """(batch, width, mlp, heads) of the block probes: ViT-B/16's at B=64."""
  return (2, 16, 64, 2) if smoke else (64, 768, 3072, 12)


def worker_block_probe_jax(smoke: bool, pad_multiple: int) -> None:
  """Forward+backward of ViT-B's attention layer, MLP and whole encoder block
  (the model's modules, bf16, as the train step runs them) at 197 and 577
  tokens; `worker_block_probe_torch` times timm's at the same shapes."""
  import jax
  import jax.numpy as jnp
  from vit_jax.models import vit
  vit.ATTENTION_PAD_MULTIPLE = pad_multiple
  impl = 'xla' if smoke else 'auto'
  batch, d, mlp, heads = _block_dims(smoke)
  # Module, and how its call says "deterministic" (the block takes it positionally).
  modules = {
      'attention': (vit.MultiHeadDotProductAttention(num_heads=heads, dtype=jnp.bfloat16,
                                                     attention=impl),
                    (), {'deterministic': True}),
      'mlp': (vit.MlpBlock(mlp, 0., jnp.bfloat16), (), {'deterministic': True}),
      'block': (vit.Encoder1DBlock(mlp, heads, 0., 0., dtype=jnp.bfloat16, attention=impl),
                (True,), {})}
  for t in (197, 577):
    x = jax.random.normal(jax.random.key(t), (batch, t, d), jnp.bfloat16)
    for part in BLOCK_PARTS:
      module, args, kwargs = modules[part]
      rec = dict(framework='jax', case=f'block-probe-T{t}-{part}', tokens=t, part=part)
      try:
        params = module.init(jax.random.key(0), x, *args, **kwargs)
        rec['ms'] = fwd_bwd_ms(
            lambda p, x, m=module, a=args, k=kwargs: m.apply(p, x, *a, **k), params, x)
      except Exception as e:  # noqa: BLE001 - report and go on
        rec['error'] = f'{type(e).__name__}: {e}'[:300]
      emit(rec)


def worker_block_probe_torch(smoke: bool, compile_: bool, parts: tuple = BLOCK_PARTS) -> None:
  """timm's Attention, Mlp and Block (`parts` of them) at
  `worker_block_probe_jax`'s shapes: AMP bf16 (its fused SDPA attention),
  forward+backward, eager or compiled."""
  try:
    import torch
    from timm.layers import Mlp
    from timm.models.vision_transformer import Attention, Block
  except ImportError as e:
    emit(dict(framework='torch', case='block-probe import', error=str(e)))
    return
  dev = 'cuda' if torch.cuda.is_available() and not smoke else 'cpu'
  sync = torch.cuda.synchronize if dev == 'cuda' else (lambda: None)
  batch, d, mlp, heads = _block_dims(smoke)
  make = {'attention': lambda: Attention(d, num_heads=heads, qkv_bias=True),
          'mlp': lambda: Mlp(d, hidden_features=mlp),
          'block': lambda: Block(d, heads, mlp_ratio=mlp / d, qkv_bias=True)}
  framework = 'torch-compile' if compile_ else 'torch'
  for t in (197, 577):
    for part in parts:
      rec = dict(framework=framework, case=f'block-probe-T{t}-{part}', tokens=t, part=part)
      try:
        module = make[part]().to(dev).train()
        x = torch.randn(batch, t, d, device=dev, requires_grad=True)

        def step(module=module, x=x):
          with torch.autocast(dev, dtype=torch.bfloat16):
            loss = (module(x).float() ** 2).sum()
          loss.backward()
          return loss
        fn = torch.compile(step) if compile_ else step
        rec['ms'] = 1e3 * statistics.median(time_torch(fn, sync, 20, warmup=3))
      except Exception as e:  # noqa: BLE001 - report and go on
        rec['error'] = f'{type(e).__name__}: {e}'[:300]
      emit(rec)


def worker_torch(cases: list, repeats: int, smoke: bool) -> None:
  try:
    import timm
    import torch
  except ImportError as e:
    emit(dict(framework='torch', case='import', error=f'{e} (pip install torch timm)'))
    return
  dev = 'cuda' if torch.cuda.is_available() and not smoke else 'cpu'
  torch.backends.cuda.matmul.allow_tf32 = True   # What JAX does for f32 on GPUs.
  torch.backends.cudnn.allow_tf32 = True
  torch.backends.cudnn.benchmark = True
  sync = torch.cuda.synchronize if dev == 'cuda' else (lambda: None)
  model_name = 'ViT-Ti_16' if smoke else 'ViT-B_16'
  arch = TIMM_ARCH[model_name]
  for name, res, batch, train, dtype, comp in cases:
    t0 = time.time()
    rec = dict(framework='torch', case=name, model=model_name, res=res, batch=batch,
               train=train, dtype=dtype, compiled=comp, torch=torch.__version__,
               timm=timm.__version__)
    try:
      model = timm.create_model(arch, img_size=res, num_classes=1000).to(dev)
      x = torch.rand(batch, 3, res, res, device=dev) * 2 - 1
      y = torch.randint(0, 1000, (batch,), device=dev)
      amp = dtype == 'bfloat16'
      if train:
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

        def step():
          with torch.autocast(dev, dtype=torch.bfloat16, enabled=amp):
            loss = torch.nn.functional.cross_entropy(model(x), y)
          loss.backward()
          opt.step()
          opt.zero_grad(set_to_none=True)
          return loss
      else:
        model.eval()

        @torch.no_grad()
        def step():
          with torch.autocast(dev, dtype=torch.bfloat16, enabled=amp):
            return model(x)
      fn = torch.compile(step) if comp else step
      times = time_torch(fn, sync, repeats, warmup=3 if comp else 2)   # compile + warm-up
      rec.update(img_s=batch / statistics.median(times), step_ms_min=1e3 * min(times),
                 step_ms_max=1e3 * max(times))
      if dev == 'cuda':
        rec['peak_mem_gb'] = torch.cuda.max_memory_allocated() / 2**30
      model = opt = fn = step = None   # Free before the next case's peak.
      if dev == 'cuda':
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    except Exception as e:  # noqa: BLE001 - report and go on
      rec['error'] = f'{type(e).__name__}: {e}'[:500]
    rec['wall_s'] = time.time() - t0
    emit(rec)


# ----------------------------------------------------------------------------
# Orchestration.
# ----------------------------------------------------------------------------

def run_worker(call: str, timeout: float, log) -> list[dict]:
  """Runs `call` of this module, e.g. ``worker_jax([...], 20, 64)``, in a fresh
  process; returns its RESULT records."""
  cmd = [sys.executable, '-c', f'import gpu_vs_timm as g; g.{call}']
  return _run(cmd, timeout, log, call)


def _run(cmd: list[str], timeout: float, log, label: str) -> list[dict]:
  """Runs `cmd` in the repository with this clone and this script importable;
  its RESULT records, plus one error record (case `label`) if it failed."""
  log.write(f'$ {" ".join(cmd)}\n')
  path = os.pathsep.join([REPO, HERE, os.environ.get('PYTHONPATH', '')])
  env = dict(os.environ, PYTHONPATH=path, PYTHONUNBUFFERED='1', TF_CPP_MIN_LOG_LEVEL='2')
  failure = None
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(timeout, 1), env=env,
                          cwd=REPO)
    out = proc.stdout + proc.stderr
    if proc.returncode:
      failure = f'exit {proc.returncode}: {out[-400:]}'
  except subprocess.TimeoutExpired as e:
    out = ''.join(x.decode() if isinstance(x, bytes) else (x or '') for x in (e.stdout, e.stderr))
    failure = f'timed out after {timeout:.0f}s'
  log.write(out + '\n')
  log.flush()
  records = [json.loads(line[7:]) for line in out.splitlines() if line.startswith('RESULT ')]
  if failure:
    records.append(dict(framework='?', case=label[:80], error=failure))
  for r in records:
    print('RESULT ' + json.dumps(r), flush=True)
  return records


def run_loop(shape: tuple, pad_multiple: int, timeout: float, log, smoke: bool) -> list[dict]:
  """The real training loop on synthetic data at a benchmark case's shape."""
  name, model_name, res, batch, _, dtype, variant = shape
  steps, every = (6, 3) if smoke else (60, 20)
  workdir = os.path.join(os.environ.get('TMPDIR', '/tmp'), f'vit_jax_loop_{os.getpid()}')
  code = ('import sys; from vit_jax.models import vit; '
          'vit.ATTENTION_PAD_MULTIPLE = int(sys.argv.pop(1)); '
          + ('vit._resolve_attention = lambda a, d: "einsum"; '   # cuDNN fallback
             if variant.get('attention') == 'einsum' else '')
          + 'from vit_jax import main; sys.exit(main.main())')
  cmd = [sys.executable, '-c', code, str(pad_multiple),
         '--config=configs/finetune_b16.py', f'--workdir={workdir}',
         '--config.dataset=synthetic', '--config.pretrained_path=None',
         f'--config.model_name={model_name}', f'--config.image_size={res}',
         f'--config.batch_size={batch}', f'--config.batch_size_eval={batch}',
         '--config.accum_steps=1', f'--config.total_steps={steps}',
         f'--config.lr.warmup_steps={every}',
         f'--config.log_every={every}', '--config.eval_every=0',
         '--config.checkpoint_every=0', '--config.num_classes=1000', f'--config.dtype={dtype}']
  t0 = time.time()
  records = _run(cmd, timeout, log, f'loop {name}')
  rec = dict(framework='loop', case=name, model=model_name, res=res, batch=batch, train=True,
             dtype=dtype, wall_s=time.time() - t0)
  try:
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
      rates = [json.loads(line)['img_sec_core_train'] for line in f
               if 'img_sec_core_train' in line]
    rec['img_s'] = rates[-1]   # The last window: steady state.
  except (OSError, IndexError, KeyError) as e:
    rec['error'] = f'no img/s in metrics.jsonl: {e}'
  emit(rec)
  return records + [rec]


def table(records: list[dict]) -> str:
  peak = next((r['tflops'] for r in records if r.get('case') == 'peak-bf16-matmul'), None)
  lines = [f'device: {next((r["device"] for r in records if "device" in r), "?")}; '
           f'measured bf16 matmul peak: {peak and round(peak)} TFLOP/s']
  probes = [r for r in records if r.get('case', '').startswith('attention-probe')]
  if probes:
    way = lambda r: (f'pad{r["pad_multiple"]}' if isinstance(r['pad_multiple'], int)
                     else r['pad_multiple'])
    lines.append('attention layer fwd+bwd (B=64, 12 heads of 64; einsum, cuDNN by token '
                 'padding): ' + '; '.join(
        f'T{r["tokens"]}/{way(r)}: ' + (f'{r["ms"]:.2f} ms' if 'ms' in r else 'refused')
        for r in probes))
    for t in sorted({r['tokens'] for r in probes}):
      timed = [r for r in probes if r['tokens'] == t and 'ms' in r]
      if timed:
        best = min(timed, key=lambda r: r['ms'])
        lines.append(f'fastest attention layer at T={t}: {best["implementation"]}'
                     + ('' if best['pad_multiple'] == 'einsum' else f' {way(best)}'))
  blocks = [r for r in records if r.get('case', '').startswith('block-probe-T') and 'ms' in r]
  if blocks:
    lines.append('ViT-B block parts, fwd+bwd ms at B=64 (vit_jax | timm eager | timm compiled):')
    for t in sorted({r['tokens'] for r in blocks}):
      cell = lambda fw, part: next((f'{r["ms"]:.2f}' for r in blocks if r['framework'] == fw
                                    and r['tokens'] == t and r['part'] == part), '-')
      lines.append(f'  T={t}: ' + '; '.join(
          f'{part} {cell("jax", part)} | {cell("torch", part)} | {cell("torch-compile", part)}'
          for part in BLOCK_PARTS))
  rows: dict[str, dict] = {}
  for r in records:
    if 'img_s' in r:
      rows.setdefault(r['case'], {})[r['framework']] = r
  head = (f'{"case":28s} {"vit_jax":>9s} {"timm":>9s} {"ratio":>6s} {"jax MFU":>8s} '
          f'{"timm MFU":>8s} {"loop":>9s} {"loop/step":>9s}')
  lines += [head, '-' * len(head)]
  for case, d in rows.items():
    j, t, lp = d.get('jax'), d.get('torch'), d.get('loop')
    model, res, train = ((j or t or lp)[k] for k in ('model', 'res', 'train'))
    flops = forward_flops(model, res) * (3 if train else 1)
    mfu = (lambda r: f'{100 * r["img_s"] * flops / 1e12 / peak:7.1f}%'
           if r and peak else f'{"-":>8s}')
    fmt = lambda r: f'{r["img_s"]:9.1f}' if r else f'{"-":>9s}'
    ratio = f'{j["img_s"] / t["img_s"]:6.2f}' if j and t else f'{"-":>6s}'
    loop_ratio = f'{lp["img_s"] / j["img_s"]:9.2f}' if lp and j else f'{"-":>9s}'
    lines.append(f'{case:28s} {fmt(j)} {fmt(t)} {ratio} {mfu(j)} {mfu(t)} {fmt(lp)} {loop_ratio}')
  comp = rows.get('B16-224-train-bf16-compile', {}).get('torch')
  ours = rows.get('B16-224-train-bf16', {}).get('jax')
  if comp and ours:
    lines.append(f'vit_jax bf16 train @224 / timm+torch.compile: {ours["img_s"] / comp["img_s"]:.2f}')
  for case in dict.fromkeys(r['case'] for r in records if r.get('framework') == 'profile'):
    prof = [r for r in records if r.get('framework') == 'profile' and r['case'] == case
            and 'ms_per_step' in r]
    lines.append(f'profile {case}: device ms/step by class and top ops')
    lines += [f'  {r["ms_per_step"]:8.2f} ms {100 * r["share"]:5.1f}%  {r["op"][:40]:40s} '
              f'{r.get("launches_per_step", ""):>5} {r.get("hlo", "")[:60]} {r.get("kernel", "")[:50]}'
              for r in prof[:22]]
  mem = [r for r in records if 'peak_mem_gb' in r and r['framework'] == 'jax']
  for r in mem:
    lines.append(f'peak device memory {r["case"]}: {r["peak_mem_gb"]:.1f} GiB')
  errors = [r for r in records if 'error' in r and not r.get('case', '').startswith('attention')]
  lines += [f'ERROR {r.get("framework")} {r.get("case")}: {r["error"][:300]}' for r in errors]
  return '\n'.join(lines)


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_bool('smoke', False, 'CPU, tiny shapes: test the script.', flag_values=fv)
  flags.DEFINE_string('out', os.environ.get('OUT', '/tmp/gpu_vs_timm'),
                      'Folder for results.jsonl, log.txt and table.txt.', flag_values=fv)
  flags.DEFINE_float('budget_s', 540, 'Seconds for the whole run: skip what no longer fits.',
                     flag_values=fv)
  flags.DEFINE_integer('repeats', 20, 'Timed steps per case; the median is reported.',
                       flag_values=fv)
  flags.DEFINE_list('stages', None, f'Run only these stages, in the usual order (default all: '
                    f'{",".join(STAGES)}), e.g. a second call for what the first had no time '
                    'for: --stages=loop,rest', flag_values=fv)


@cli.command(define_flags)
def main(args: cli.Args) -> None:
  """Runs the workers in turn and prints the table."""
  from vit_jax.models import vit   # Only for the default pad; no JAX backend started.
  os.makedirs(args.out, exist_ok=True)
  start = time.time()
  left = lambda: args.budget_s - (time.time() - start)
  records: list[dict] = []
  with open(os.path.join(args.out, 'log.txt'), 'w') as log:
    def worker(fn: Callable, share: float, *fn_args) -> None:
      """fn(*fn_args) in its own process, within `share` of the budget left."""
      call = f'{fn.__name__}({", ".join(map(repr, fn_args))})'
      if left() < 20:
        records.append(dict(framework=fn.__name__, case=call[:80],
                            error='skipped: out of --budget_s'))
        return
      records.extend(run_worker(call, share * left(), log))

    stages = args.stages or STAGES
    if set(stages) - set(STAGES):
      raise ValueError(f'--stages takes some of {", ".join(STAGES)}, got {stages}')
    want = lambda stage: stage in stages
    if want('peak'):
      worker(worker_jax_peak, 0.2, args.smoke)
    pad = vit.ATTENTION_PAD_MULTIPLE
    if want('probe'):
      worker(worker_attention_probe, 0.2, args.smoke)
      pad = _best_pad(records)
      if pad is None:   # The kernel took no padding (or no GPU): einsum attention.
        print('cuDNN attention unavailable: timing the einsum attention', flush=True)
        JAX_CASES[:] = [c[:6] + ({'attention': 'einsum', **c[6]},) for c in JAX_CASES]
        JAX_EXTRA[:] = [c[:6] + ({'attention': 'einsum', **c[6]},) for c in JAX_EXTRA]
        pad = vit.ATTENTION_PAD_MULTIPLE
    print(f'attention padding: multiple of {pad}', flush=True)
    jax_cases, torch_cases = (SMOKE_JAX, SMOKE_TORCH) if args.smoke else (JAX_CASES, TORCH_CASES)
    if want('steps'):
      worker(worker_jax, 0.5, jax_cases, args.repeats, pad)
    if want('timm'):
      worker(worker_torch, 0.4, torch_cases if args.smoke else torch_cases[:3], args.repeats,
             args.smoke)
      if not args.smoke:
        worker(worker_torch, 0.5, torch_cases[3:], args.repeats, args.smoke)
    if want('loop') and left() > 30:   # The acceptance figures first, then diagnostics.
      records.extend(run_loop(jax_cases[0], pad, 0.4 * left(), log, args.smoke))
    if want('pads'):   # The train steps at the other paddings, in one process.
      worker(worker_jax, 0.9, [(f'{c[0]}-pad{m}',) + c[1:6] + ({**c[6], 'pad_multiple': m},)
                               for m in STEP_PAD_CANDIDATES if m != pad
                               for c in jax_cases if c[4]], args.repeats, pad)
    if want('profile'):   # Where the train steps' time goes.
      worker(worker_profile, 0.5, [c for c in jax_cases if c[4]][:2], pad, args.out)
    if want('blocks'):   # The block's parts against timm's at the same shapes.
      worker(worker_block_probe_jax, 0.3, args.smoke, pad)
      worker(worker_block_probe_torch, 0.3, args.smoke, False)
      worker(worker_block_probe_torch, 0.4, args.smoke, True, ('block',))
    if want('rest') and args.smoke:   # The XLA-flags path, once.
      worker(worker_jax, 0.4, jax_cases[:1], args.repeats, pad, XLA_FLAG_VARIANTS[0])
    elif want('rest'):
      for case in JAX_EXTRA[3:]:   # Each in its own process: its own peak memory.
        worker(worker_jax, 0.6, [case], args.repeats, pad)
      worker(worker_jax, 0.6, JAX_EXTRA[1:3], args.repeats, pad)
      # Settled twice (benchmarks/RESULTS.md), rerun last when time is left.
      worker(worker_jax, 0.4, JAX_EXTRA[:1], args.repeats, pad)
      for flags in XLA_FLAG_VARIANTS:   # The 224 step under other XLA code generation.
        worker(worker_jax, 0.4, JAX_CASES[:1], args.repeats, pad, flags)
  with open(os.path.join(args.out, 'results.jsonl'), 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in records)
  text = table(records)
  with open(os.path.join(args.out, 'table.txt'), 'w') as f:
    f.write(text + '\n')
  print(f'\n{text}\n(total {time.time() - start:.0f} s)', flush=True)


def _best_pad(records: list[dict]) -> int | None:
  """The padding the kernel took at both token counts, fastest in sum."""
  ok: dict[int, float] = {}
  for m in PAD_CANDIDATES:
    times = [r.get('ms') for r in records
             if r.get('case', '').startswith('attention-probe') and r['pad_multiple'] == m]
    if len(times) == 2 and all(t is not None for t in times):
      ok[m] = sum(times)
  return min(ok, key=ok.get) if ok else None


if __name__ == '__main__':
  sys.exit(main())
