"""Stop requests: SIGTERM or SIGINT ends training cleanly at the next metrics read (every
`run.log_every_n_steps` optimizer steps), with a checkpoint; the process then exits with
128 + the signal's number (143 for SIGTERM, 130 for SIGINT), the shell's code for "stopped by
that signal", so a scheduler or `train.py && sample.py` never takes the stop for a finished run."""

import signal
import sys


class StopRequest:
    """A flag set by SIGTERM/SIGINT, checked by the loop whenever it reads the metrics back.

    The first signal asks for a checkpoint and a clean exit; a second SIGINT (Ctrl-C twice)
    aborts at once.
    """

    def __init__(self):
        self.requested = False
        self.signum = 0  # the first signal received
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum: int, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested, self.signum = True, self.signum or signum
        name = signal.Signals(signum).name
        print(f"\n{name}: finishing the steps up to the next metrics read, then saving a checkpoint (Ctrl-C again to abort)", file=sys.stderr, flush=True)

    @property
    def exit_code(self) -> int:
        """128 + the signal's number; SIGTERM's where another rank received the signal."""
        return 128 + (self.signum or signal.SIGTERM)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
