"""SIGTERM / SIGINT for a training loop that must always stop.

The first signal sets a flag the loop acts on between steps (save, exit 0). The loop
can also be blocked outside a step, where it never looks at the flag: in its data
iterator (e.g. skipping bad examples forever), compiling, or evaluating. So:

- a second signal raises `RunInterrupted` in the main thread, wherever it is;
- a first signal the loop has not acknowledged within `grace_s` seconds does the same
  (a watchdog thread re-sends the signal to the main thread, which wakes blocking
  system calls);
- if the main thread is stuck in native code and does not even run the handler within
  another `grace_s`, the watchdog ends the process (exit code 128 + signal number).
"""

import os
import signal
import sys
import threading
import time
from typing import Optional


class RunInterrupted(RuntimeError):
  """The run was stopped by a signal outside a step boundary; `exit_code` = 128 + signum."""

  def __init__(self, message: str, signum: int):
    super().__init__(message)
    self.exit_code = 128 + int(signum)


class StopRequests:
  """Context manager: installs the handlers on the main thread, restores them on exit.

  requested: name of the first signal ("SIGTERM") or None.
  acknowledge(): the loop has passed a step boundary since the request, so it is not
    blocked and will stop in order (several processes stop at the next boundary they
    agree on); the grace timer stops (a second signal still interrupts).
  """

  def __init__(self, grace_s: float):
    self.grace_s = float(grace_s)
    self.requested: Optional[str] = None
    self.acknowledged = False
    self._signum = 0
    self._expired = False
    self._responded = threading.Event()
    self._previous = {}
    self._main = threading.main_thread().ident

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread: no handlers, no preemption support
        pass
    return self

  def __exit__(self, *exc):
    self._responded.set()  # the loop is done: the watchdog must not kill the process
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def acknowledge(self) -> None:
    self.acknowledged = True

  def _handle(self, signum, frame):
    del frame
    name = signal.Signals(signum).name
    if self.requested is None:
      self.requested, self._signum = name, signum
      if self.grace_s > 0:
        threading.Thread(target=self._watchdog, daemon=True, name="stop-watchdog").start()
      return
    self._responded.set()
    if self._expired:
      raise RunInterrupted(
          f"{self.requested} received, but the loop did not reach a step boundary within "
          f"preemption_grace_s={self.grace_s:g} s (blocked in data loading, compilation or "
          "evaluation)", self._signum)
    raise RunInterrupted(f"second signal ({name} after {self.requested})", signum)

  def _watchdog(self):
    deadline = time.monotonic() + self.grace_s
    while time.monotonic() < deadline:
      if self.acknowledged or self._responded.is_set():
        return
      time.sleep(min(0.1, self.grace_s))
    if self.acknowledged or self._responded.is_set():
      return
    self._expired = True
    signal.pthread_kill(self._main, self._signum)
    if not self._responded.wait(self.grace_s):
      sys.stderr.write(f"{self.requested}: the main thread did not respond within "
                       f"{2 * self.grace_s:g} s (stuck in native code); exiting without "
                       "saving. The last checkpoint is intact.\n")
      sys.stderr.flush()
      os._exit(128 + self._signum)
