"""Training checkpoints: orbax CheckpointManager holding the train state and the data iterator.

- Async saves every N steps (and forced ones at the end / on SIGTERM), keeping the last K.
- Restore always goes into an abstract target whose shardings come from the *current* mesh, so a
  checkpoint written on one mesh shape restores onto another.
- A latest step that fails to restore (truncated, corrupt) is skipped with a warning and the
  previous one is used; the unreadable step is moved aside (`unreadable-STEP/`, kept for a
  post-mortem) so that the run can save that step number again. Orbax never lists a step whose
  save did not finish.
- `PreemptionFlag` turns SIGTERM into a stop step the loop checks between steps (agreed
  across hosts through JAX's preemption service).
"""

from __future__ import annotations

import logging
import os
import signal
from typing import Any

import jax
import orbax.checkpoint as ocp

STATE, DATA = "state", "data"


class CheckpointManager:
  def __init__(self, directory: str, save_every: int, keep: int, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=save_every, max_to_keep=keep, enable_async_checkpointing=async_save,
        create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=(STATE, DATA))

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any, data_state: dict[str, Any] | None, force: bool = False) -> bool:
    args = {STATE: ocp.args.StandardSave(state)}
    args[DATA] = ocp.args.JsonSave(data_state or {})
    return self._manager.save(step, args=ocp.args.Composite(**args), force=force)

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[int, Any, dict] | None:
    """(step, state, data_state) of `step`, or of the newest step that restores; None if none."""
    steps = [step] if step is not None else sorted(self.all_steps(), reverse=True)
    for i, s in enumerate(steps):
      try:
        out = self._manager.restore(s, args=ocp.args.Composite(
            **{STATE: ocp.args.StandardRestore(abstract_state), DATA: ocp.args.JsonRestore()}))
      except MemoryError:  # the host, not the step, is at fault: never roll back over it
        raise
      except Exception as e:  # noqa: BLE001 - any failure to read a step means: try the previous
        if step is not None or i == len(steps) - 1:
          raise RuntimeError(f"{self.directory}: cannot restore step {s}: {e}") from e
        logging.warning("checkpoint step %d in %s does not restore (%s: %s); falling back to "
                        "step %d", s, self.directory, type(e).__name__, str(e)[:200], steps[i + 1])
        continue
      self._move_aside(steps[:i])
      return s, out[STATE], dict(out[DATA] or {})
    return None

  def _move_aside(self, unreadable: list[int]) -> None:
    """Renames unreadable step directories to unreadable-STEP (orbax then no longer lists them,
    and the resumed run can write those steps again; orbax refuses to overwrite a step)."""
    if not unreadable:
      return
    if jax.process_index() == 0:
      for s in unreadable:
        src = os.path.join(self.directory, str(s))
        dst = os.path.join(self.directory, f"unreadable-{s}")
        while os.path.exists(dst):
          dst += "-again"
        os.replace(src, dst)
        logging.warning("moved the unreadable checkpoint step %d aside to %s", s, dst)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("janus_jax checkpoint: unreadable steps moved aside")
    self._manager.reload()

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying the current mesh's shardings (the restore target)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


class PreemptionFlag:
  """SIGTERM (a preemption notice) -> the train loop saves and stops, at a step every host agrees
  on. One process: a Python signal handler sets `raised`. Several: JAX's preemption service (set
  up by jax.distributed.initialize) catches the signal and picks a sync step that `reached` asks
  about, so that no host enters the collective save while another runs the next step."""

  def __init__(self, signals=(signal.SIGTERM,)):
    self.raised = False
    self._multihost = jax.process_count() > 1
    self._previous = {} if self._multihost else {s: signal.signal(s, self._handle) for s in signals}

  def reached(self, step: int) -> bool:
    """Whether to save and stop after `step` (call it after every step, on every host)."""
    if self._multihost and not self.raised:
      from jax.experimental import multihost_utils
      try:
        self.raised = bool(multihost_utils.reached_preemption_sync_point(step))
      except RuntimeError as e:  # jax_enable_preemption_service is off: SIGTERM just kills
        logging.warning("no preemption service (%s): a SIGTERM will not save a checkpoint", e)
        self._multihost = False
    return self.raised

  def _handle(self, signum, frame) -> None:
    del frame
    logging.warning("received signal %d: saving a checkpoint and stopping", signum)
    self.raised = True

  def restore_handlers(self) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, handler)
