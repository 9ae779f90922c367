"""Stop requests: SIGTERM or SIGINT ends training cleanly at the next metrics read (every
`run.log_every_n_steps` optimizer steps), with a checkpoint."""

import signal
import sys


class StopRequest:
    """A flag set by SIGTERM/SIGINT, checked by the loop whenever it reads the metrics back.

    The first signal asks for a checkpoint and a clean exit; a second SIGINT (Ctrl-C twice)
    aborts at once.
    """

    def __init__(self):
        self.requested = False
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum: int, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        name = signal.Signals(signum).name
        print(f"\n{name}: finishing the steps up to the next metrics read, then saving a checkpoint (Ctrl-C again to abort)", file=sys.stderr, flush=True)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
