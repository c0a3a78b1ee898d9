"""Tests for vit_jax.benchmark: what is timed, how figures are derived, the train step."""

import statistics

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import benchmark


class _FakeClock:
  """perf_counter stand-in: call k returns ticks[k]."""

  def __init__(self, ticks):
    self.ticks = list(ticks)
    self.calls = 0

  def __call__(self):
    self.calls += 1
    return self.ticks[self.calls - 1]


def test_time_calls_counts_and_excludes_warmup():
  calls = []
  fn = lambda: calls.append(1) or jnp.zeros(())
  # Warm-up is not timed: the clock is read only around the 3 timed calls.
  clock = _FakeClock([0.0, 0.5, 1.0, 1.25, 2.0, 3.0])
  times = benchmark.time_calls(fn, repeats=3, warmup=2, timer=clock)
  assert len(calls) == 5
  assert clock.calls == 6
  np.testing.assert_allclose(times, [0.5, 0.25, 1.0])


def test_time_calls_rejects_compilation_inside_timing():
  shapes = iter([(2,), (3,)])  # a new shape each call forces a retrace + compile
  f = jax.jit(lambda x: x * 2)
  with pytest.raises(RuntimeError, match='compilation'):
    benchmark.time_calls(lambda: f(jnp.ones(next(shapes))), repeats=2, warmup=0)


def test_time_calls_bad_repeats():
  with pytest.raises(ValueError, match='repeats must be >= 1'):
    benchmark.time_calls(lambda: jnp.zeros(()), repeats=0)


@pytest.fixture(scope='module')
def tiny():
  return benchmark.build('testing', num_classes=10, resolution=8)


def test_benchmark_inference_figures(tiny):
  model, variables = tiny
  clock = _FakeClock([0.0, 0.1, 1.0, 1.3, 2.0, 2.2])
  r = benchmark.benchmark(model, variables, batch=6, resolution=8, repeats=3, timer=clock,
                          name='testing')
  assert clock.calls == 6  # only the 3 timed calls read the clock
  np.testing.assert_allclose(r.step_times, [0.1, 0.3, 0.2])
  assert r.images_per_sec == pytest.approx(6 / 0.2)  # batch / median
  assert r.mode == 'inference' and r.compile_s > 0
  assert r.num_params == sum(x.size for x in jax.tree.leaves(variables['params']))
  assert r.gflops_per_image is None or r.gflops_per_image > 0
  assert '30.0 img/s' in r.summary()


def test_benchmark_train_real_clock(tiny):
  model, variables = tiny
  before = jax.tree.map(np.asarray, variables['params'])
  r = benchmark.benchmark(model, variables, batch=4, resolution=8, train=True, repeats=2,
                          num_classes=10)
  assert r.mode == 'train'
  assert len(r.step_times) == 2 and all(t > 0 for t in r.step_times)
  assert r.images_per_sec == pytest.approx(4 / statistics.median(r.step_times))
  assert r.compile_s > 0
  # The step donates a copy: the caller's params are intact and unchanged.
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(variables['params'])):
    np.testing.assert_array_equal(a, b)


def test_timed_train_step_is_the_loops_step(tiny):
  """`--train` times train_step.make_train_step under FINETUNE_RECIPE: a timed call
  returns the loss of a hand-run loop step from the same state and batch."""
  import ml_collections

  from vit_jax import optim, train_step
  model, variables = tiny
  # The head is zero-initialised; perturb it so every gradient is non-trivial.
  variables = {'params': jax.tree.map(lambda p: p + 0.01, variables['params'])}
  step = benchmark.compile_step(model, variables, batch=4, resolution=8, train=True,
                                num_classes=10)
  losses = [float(step.call()) for _ in range(2)]

  recipe = benchmark.train_recipe()
  assert recipe.optim.grad_clip_norm == 1.0 and recipe.optim.momentum == 0.9
  schedule = optim.schedule_from_config(recipe)
  tx = optim.make_optimizer(recipe.optim, schedule)
  key = jax.random.key(0)   # compile_step's images and labels, by the same draws
  batch = {'image': jax.random.uniform(key, (4, 8, 8, 3), jnp.float32, -1., 1.),
           'label': jax.random.randint(jax.random.fold_in(key, 1), (4,), 0, 10)}
  state = {'step': jnp.zeros((), jnp.int32), 'params': variables['params'],
           'opt_state': tx.init(variables['params'])}
  loop_step = jax.jit(train_step.make_train_step(model, tx, schedule, recipe))
  ref = []
  for _ in range(2):
    state, metrics = loop_step(state, batch, key)
    ref.append(float(metrics['train_loss']))
  np.testing.assert_allclose(losses, ref, rtol=1e-6)
  assert losses[1] != losses[0]   # The second call trained on the updated state.
  cfg = ml_collections.ConfigDict({'optim': {'name': 'adamw'}, 'accum_steps': 2})
  assert benchmark.train_recipe(cfg).optim.name == 'adamw'
  assert benchmark.train_recipe(cfg).accum_steps == 2


def test_config_merging_and_errors(tiny):
  import ml_collections
  cfg = ml_collections.ConfigDict({'model_name': 'testing',
                                   'model': {'transformer': {'num_layers': 1}}})
  model_cfg, name = benchmark.model_config_from_experiment(cfg)
  assert name == 'testing'
  assert model_cfg['transformer']['num_layers'] == 1
  assert model_cfg['transformer']['num_heads'] == 2  # kept from the preset
  with pytest.raises(ValueError, match='neither `model_name` nor `model`'):
    benchmark.model_config_from_experiment(ml_collections.ConfigDict({'seed': 0}))
  with pytest.raises(ValueError, match='dtype must be one of'):
    benchmark.build('testing', num_classes=2, resolution=8, dtype='float16')
  with pytest.raises(ValueError, match='batch and resolution must be positive'):
    benchmark.benchmark(*tiny, batch=0, resolution=8)


def _train_step_script():
  import importlib.util
  import pathlib
  path = pathlib.Path(__file__).resolve().parents[1] / 'benchmarks' / 'train_step.py'
  spec = importlib.util.spec_from_file_location('bench_train_step', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize('classifier', ['token', 'gap'])
def test_timm_peer_has_our_shape(classifier):
  """The timm model we compare against has exactly our parameter count."""
  script = _train_step_script()
  timm, msg = script.import_timm()
  if timm is None:
    pytest.skip(msg)
  from vit_jax import models
  cfg = models.get_config('ViT-Ti_16').to_dict()
  cfg['classifier'] = classifier
  peer, _ = script.timm_peer(cfg, resolution=64, num_classes=10)
  ours = jax.eval_shape(lambda: models.get_model(cfg, num_classes=10).init(
      jax.random.key(0), jnp.zeros((1, 64, 64, 3))))['params']
  n_ours = sum(x.size for x in jax.tree.leaves(ours))
  assert sum(p.numel() for p in peer.parameters()) == n_ours
  peer_none, why = script.timm_peer(dict(cfg, tokenizer={'type': 'rpt'}), resolution=64,
                                    num_classes=10)
  assert peer_none is None and 'no timm peer' in why


@pytest.mark.slow
def test_gpu_vs_timm_smoke_runs_every_worker(tmp_path):
  """The GPU script's CPU smoke run: peak, attention probe, vit_jax cases and the
  real loop all report, and the table is written (timm rows only with torch)."""
  import json
  import os
  import subprocess
  import sys
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  sys.path.insert(0, os.path.join(repo, 'benchmarks'))
  import gpu_vs_timm as g
  env = dict(os.environ, PYTHONPATH=repo)
  proc = subprocess.run([sys.executable, 'benchmarks/gpu_vs_timm.py', '--smoke', '--out',
                         str(tmp_path)], cwd=repo, env=env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  records = [json.loads(line) for line in (tmp_path / 'results.jsonl').read_text().splitlines()]
  cases = {r['case']: r for r in records}
  for t in (197, 577):
    assert cases[f'attention-probe-T{t}-einsum']['ms'] > 0
    for multiple in g.PAD_CANDIDATES:   # 'xla' stands in for cuDNN
      assert cases[f'attention-probe-T{t}-{multiple}']['ms'] > 0
  jax_rows = [r for r in records if r['framework'] == 'jax' and 'img_s' in r]
  rows = {r['case']: r for r in jax_rows}
  pad = rows['Ti16-32-train-f32']['pad_multiple']   # The probe's fastest.
  assert set(rows) == {
      'Ti16-32-train-f32', 'Ti16-32-infer-f32', 'Ti16-32-train-f32 +triton_gemm_any=true',
      *(f'Ti16-32-train-f32-pad{m}' for m in g.STEP_PAD_CANDIDATES if m != pad)}
  assert all(rows[f'Ti16-32-train-f32-pad{m}']['pad_multiple'] == m
             for m in g.STEP_PAD_CANDIDATES if m != pad)
  loop = next(r for r in records if r['framework'] == 'loop')
  assert loop['img_s'] > 0
  blocks = [r for r in records if r['framework'] == 'jax' and r['case'].startswith('block-probe')]
  assert sorted((r['tokens'], r['part']) for r in blocks if r['ms'] > 0) == sorted(
      (t, p) for t in (197, 577) for p in ('attention', 'mlp', 'block'))
  prof = [r for r in records if r['framework'] == 'profile']
  total = next(r for r in prof if r['op'] == 'TOTAL device time')
  classes = [r for r in prof if r['op'].startswith('class ')]
  assert total['ms_per_step'] > 0
  assert sum(r['ms_per_step'] for r in classes) == pytest.approx(total['ms_per_step'])
  top = [r for r in prof if 'hlo' in r]
  assert top and all(r['hlo'] for r in top)   # Every timed op found in the program.
  assert (tmp_path / 'Ti16-32-train-f32.hlo.txt.gz').stat().st_size > 0
  table = (tmp_path / 'table.txt').read_text()
  assert 'fastest attention layer at T=197' in table and 'Ti16-32-train-f32' in table
  assert 'profile Ti16-32-train-f32' in table


def test_op_profile_sums_a_trace_by_hlo_op(tmp_path):
  """The profile parser on a real trace of a known program: every op it
  times is an instruction of the optimised HLO, and per-op times add up."""
  import os
  import sys
  import jax
  import jax.numpy as jnp
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), 'benchmarks'))
  import gpu_vs_timm as g
  f = jax.jit(lambda a: jnp.tanh(a @ a.T).sum(0))
  a = jnp.ones((128, 64))
  compiled = f.lower(a).compile()
  compiled(a).block_until_ready()
  with jax.profiler.trace(str(tmp_path), create_perfetto_trace=True):
    for _ in range(2):
      compiled(a).block_until_ready()
  trace = next(os.path.join(r, n) for r, _, fs in os.walk(tmp_path) for n in fs
               if n == 'perfetto_trace.json.gz')
  hlo = compiled.as_text()
  rows = g.op_profile(trace, hlo, steps=2)
  ops = [r for r in rows if 'hlo' in r]
  assert ops and all(r['op'] in g.hlo_ops(hlo) for r in ops)
  assert all(r['launches_per_step'] == 1 for r in ops)
  total = rows[0]['ms_per_step']
  assert sum(r['ms_per_step'] for r in ops) == pytest.approx(total)
  # A GPU trace's shape: kernels on a device process's streams, most naming
  # their HLO op; host events and other processes are not device time.
  import gzip
  import json
  fake = tmp_path / 'gpu.json.gz'
  with gzip.open(fake, 'wt') as f:
    json.dump({'traceEvents': [
        {'ph': 'M', 'pid': 1, 'name': 'process_name', 'args': {'name': '/device:GPU:0'}},
        {'ph': 'M', 'pid': 2, 'name': 'process_name', 'args': {'name': '/host:CPU'}},
        {'ph': 'X', 'pid': 1, 'name': 'sm90_xmma_gemm', 'dur': 30.0,
         'args': {'hlo_op': 'custom-call.1'}},
        {'ph': 'X', 'pid': 1, 'name': 'Memset', 'dur': 1.0, 'args': {'hlo_op': 'custom-call.1'}},
        {'ph': 'X', 'pid': 1, 'name': 'sm90_xmma_gemm', 'dur': 29.0,
         'args': {'hlo_op': 'custom-call.1'}},
        {'ph': 'X', 'pid': 1, 'name': 'loop_transpose_fusion', 'dur': 20.0, 'args': {}},
        {'ph': 'X', 'pid': 2, 'name': 'PjitFunction', 'dur': 500.0,
         'args': {'hlo_op': 'custom-call.1'}}]}, f)
  # (cuBLASLt's ops return a tuple: the product and its workspace.)
  rows = g.op_profile(str(fake), '  %custom-call.1 = (bf16[8,8]{1,0}, s8[64]{0}) custom-call('
                      '%a, %b), custom_call_target="__cublas$lt$matmul"', steps=2)
  assert rows[0]['ms_per_step'] == pytest.approx(0.04)
  gemm = next(r for r in rows if r['op'] == 'custom-call.1')
  assert gemm['kernel'] == 'sm90_xmma_gemm' and gemm['launches_per_step'] == 1.5   # Not the memset.
  assert gemm['hlo'].startswith('custom-call __cublas$lt$matmul (bf16[8,8]')
  assert {r['op']: (r['op_class'], r['ms_per_step']) for r in rows[1:]} == {
      'class matmul': ('matmul', 0.03), 'class copy/transpose': ('copy/transpose', 0.01),
      'custom-call.1': ('matmul', 0.03), 'loop_transpose_fusion': ('copy/transpose', 0.01)}
  assert g.op_class('custom-call __cudnn$fmhaSoftmax bf16[]', '') == 'attention'
  assert g.op_class('custom-call __cublas$lt$matmul f32[]', '') == 'matmul'
  assert g.op_class('fusion kLoop bf16[]', 'loop_transpose_fusion') == 'copy/transpose'


def test_memory_estimate_counts_the_step_parts():
  """benchmarks/memory.py from shapes alone: f32 params, bf16 momentum, f32
  gradients and accumulator, the batch, and the backward's residuals, which
  per-block remat shrinks and which grow with the micro-batch."""
  import os
  import sys
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), 'benchmarks'))
  import memory
  from vit_jax import hub
  n = sum(p.size for p in jax.tree.leaves(
      hub.init('testing', num_classes=1000, image_size=32, dtype='float32').params))
  mem = memory.step_memory('testing', resolution=32, batch=8, accum_steps=2)
  assert mem['params'] == mem['gradients'] == mem['accumulator'] == 4 * n
  assert mem['optimizer'] == pytest.approx(2 * n, abs=64)   # (+ optax's step counts)
  assert mem['batch'] == 8 * 32 * 32 * 3 * 4
  assert mem['total'] == sum(v for k, v in mem.items() if k != 'total')
  one = memory.step_memory('testing', resolution=32, batch=8, accum_steps=1)
  assert one['accumulator'] == 0 and one['residuals'] > mem['residuals']   # 8 vs 4 images
  remat = memory.step_memory('testing', resolution=32, batch=8, accum_steps=2, remat='full')
  assert remat['residuals'] < mem['residuals']
  with pytest.raises(ValueError, match='not divisible'):
    memory.step_memory('testing', resolution=32, batch=8, accum_steps=3)
