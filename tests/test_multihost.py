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

_WORKER = textwrap.dedent("""
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


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_every_hosts_data_position_is_checkpointed():
  """orbax writes the JSON data item from the primary host only: the states are gathered first,
  and each host resumes from its own."""
  port = _free_port()
  env = {"XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
  procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(port), str(pid)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **env}) for pid in (0, 1)]
  outputs = [p.communicate(timeout=240) for p in procs]
  results = []
  for p, (out, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
    results.append(json.loads(out.split("RESULT ", 1)[1]))
  states = [{"host": 0, "position": [0, "xxx"]}, {"host": 1, "position": [7, "x" * 43]}]
  for pid, r in enumerate(results):
    assert r["saved"] == {"processes": states}
    assert r["own"] == states[pid]


def test_a_data_state_from_another_host_count_is_refused():
  with pytest.raises(ValueError, match="comes from 2 host"):
    support._this_process_state({"processes": [{}, {}]})
  assert support._this_process_state({"processes": [{"a": 1}]}) == {"a": 1}
  assert support._this_process_state({"a": 1}) == {"a": 1}  # written before states were gathered
