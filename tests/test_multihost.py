"""Two real JAX processes on this host (CPU, gloo collectives): what only multi-host runs exercise."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from janus_jax import train_support as support

_DATA_STATE_WORKER = textwrap.dedent("""
    import json, sys
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    port, pid = sys.argv[1], int(sys.argv[2])
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=pid)
    from janus_jax import train_support as support

    class Iterator:  # what data_state reads of a grain DatasetIterator
      def get_state(self):
        return {"host": pid, "position": [7 * pid, "x" * (3 + 40 * pid)]}

    saved = json.loads(json.dumps(support.data_state(Iterator())))  # as orbax's JSON item holds it
    print("RESULT", json.dumps({"saved": saved, "own": support._this_process_state(saved)}))
""")


_EXPORT_WORKER = textwrap.dedent("""
    import sys
    import jax, ml_collections, numpy as np
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    port, pid, dst = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=pid)
    from janus_jax import pretrained
    params = {"w": np.arange(6, dtype=np.float32).reshape(2, 3) + float(sys.argv[4])}
    pretrained.write_converted(dst, params, ml_collections.ConfigDict({"a": 1}), "janus_pro",
                               None, overwrite=True)
    print("RESULT done")
""")


_PREEMPTION_WORKER = textwrap.dedent("""
    import os, signal, sys, time
    import jax, numpy as np
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    port, pid = sys.argv[1], int(sys.argv[2])
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=pid)
    from jax.experimental import multihost_utils
    from janus_jax import checkpointing
    flag = checkpointing.PreemptionFlag()
    for step in range(1, 1000):
      multihost_utils.process_allgather(np.array([step]))  # a collective per step, as a train step
      if step == 20 and pid == 1:
        os.kill(os.getpid(), signal.SIGTERM)  # only host 1 is told
      if flag.reached(step):
        print("RESULT", step, flush=True)
        break
      time.sleep(0.01)
""")


_VQ_WORKER = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp, numpy as np
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    port, pid, repo = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=pid)
    sys.path.insert(0, repo + "/tests")
    from janus_jax import sharding, train_support as support
    from janus_jax.models import janus as janus_lib
    from test_model_shapes import load_config
    model = janus_lib.build(load_config("tiny").model)
    host = janus_lib.init_params_host(model, 0)
    mesh = sharding.make_mesh((1, 2, 1))  # fsdp spans the two hosts
    shardings = sharding.param_shardings(janus_lib.abstract_params(model), mesh)
    params = jax.tree.map(lambda x, s: jax.make_array_from_callback(x.shape, s, lambda i: x[i]),
                          host, shardings)
    pixels = np.random.default_rng(pid).uniform(-1, 1, (3, 8, 8, 3)).astype(np.float32)
    ids = support.make_vq_encoder(model, params)(pixels)
    alone = jax.jit(lambda p, x: model.apply({"params": p}, x, method=janus_lib.Janus.vq_encode))(
        {"generation_tokenizer": host["generation_tokenizer"]}, jnp.asarray(pixels))
    # A stage-0 VQ comes as host numpy arrays, whole on every host: nothing to gather.
    as_numpy = {**params, "generation_tokenizer": host["generation_tokenizer"]}
    ids_numpy = support.make_vq_encoder(model, as_numpy)(pixels)
    print("RESULT", bool(np.array_equal(ids, np.asarray(alone))
                         and np.array_equal(ids_numpy, np.asarray(alone))), flush=True)
""")


_BATCH_WORKER = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    port, pid = sys.argv[1], int(sys.argv[2])
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=pid)
    from janus_jax import sharding, train_support as support
    out = {}
    for shape in [(2, 1, 1), (1, 2, 1), (1, 1, 2)]:
      mesh = sharding.make_mesh(shape)
      index, count = sharding.process_rows(mesh, 4)
      n = 4 // count
      rows = np.arange(4)[index * n:(index + 1) * n]  # what this host's shard of the data holds
      local = {"ids": np.stack([rows * 10, rows * 10 + 1], axis=1).astype(np.int32)}
      batch = support.global_batch(local, {"ids": sharding.batch_sharding(mesh, 2)}, 4)["ids"]
      total = jax.jit(lambda x: x.sum(0), out_shardings=sharding.replicated(mesh))(batch)
      out[str(shape)] = [index, count, list(batch.shape), np.asarray(total).tolist()]
    print("RESULT", json.dumps(out), flush=True)
""")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _run_pair(script: str, *args: str) -> list[str]:
  """Runs script as JAX processes 0 and 1 (argv: port, process id, *args); their RESULT lines."""
  port = _free_port()
  procs = [subprocess.Popen([sys.executable, "-c", script, str(port), str(pid), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"})
           for pid in (0, 1)]
  results = []
  for p in procs:
    out, err = p.communicate(timeout=240)
    assert p.returncode == 0 and "RESULT " in out, err[-3000:]
    results.append(out.split("RESULT ", 1)[1].strip())
  return results


def test_every_hosts_data_position_is_checkpointed():
  """orbax writes the JSON data item from the primary host only: the states are gathered first,
  and each host resumes from its own."""
  results = [json.loads(r) for r in _run_pair(_DATA_STATE_WORKER)]
  states = [{"host": 0, "position": [0, "xxx"]}, {"host": 1, "position": [7, "x" * 43]}]
  for pid, r in enumerate(results):
    assert r["saved"] == {"processes": states}
    assert r["own"] == states[pid]


def test_a_data_state_from_another_host_count_is_refused():
  with pytest.raises(ValueError, match="comes from 2 host"):
    support._this_process_state({"processes": [{}, {}]})
  assert support._this_process_state({"processes": [{"a": 1}]}) == {"a": 1}
  assert support._this_process_state({"a": 1}) == {"a": 1}  # written before states were gathered


def test_an_export_from_two_hosts_is_one_complete_directory(tmp_path):
  """Both processes write into one temporary directory (orbax's save is collective) and process 0
  renames it into place; a second export replaces the first whole, leaving no temporaries."""
  import numpy as np
  import orbax.checkpoint as ocp

  from janus_jax import pretrained

  dst = tmp_path / "model"
  for offset in ("0", "10"):
    _run_pair(_EXPORT_WORKER, str(dst), offset)
    assert json.loads((dst / "config.json").read_text())["model"] == {"a": 1}
    restored = ocp.StandardCheckpointer().restore(str(dst / pretrained.CONVERTED_MARKER))
    np.testing.assert_array_equal(restored["w"], np.arange(6).reshape(2, 3) + float(offset))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_sigterm_on_one_host_stops_every_host_at_the_same_step():
  """The train loop saves (a collective) and stops when PreemptionFlag.reached says so: every host
  must agree on the step, or one would wait in the save while another runs the next step."""
  steps = [int(r) for r in _run_pair(_PREEMPTION_WORKER)]
  assert steps[0] == steps[1] >= 20, steps


def test_each_host_vq_encodes_its_own_images():
  """The data pipeline's VQ encoder on a mesh whose fsdp axis spans hosts: each host's ids are
  those of its own pixels (a global computation would mix the hosts' images)."""
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  assert _run_pair(_VQ_WORKER, repo) == ["True", "True"]


def test_each_host_reads_the_rows_its_devices_hold():
  """The global batch on meshes whose batch axes span both hosts, or neither (the tensor axis
  across hosts: both hold, so both read, every row). Before, each host read half the rows
  whatever the mesh, and the (1, 1, 2) mesh built a 2-row batch that differed between hosts."""
  whole = [0 + 10 + 20 + 30, 1 + 11 + 21 + 31]
  results = [json.loads(r) for r in _run_pair(_BATCH_WORKER)]
  for pid, r in enumerate(results):
    assert r["(2, 1, 1)"] == [pid, 2, [4, 2], whole]
    assert r["(1, 2, 1)"] == [pid, 2, [4, 2], whole]
    assert r["(1, 1, 2)"] == [0, 1, [4, 2], whole]
