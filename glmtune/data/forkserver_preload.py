"""Imported first by the DataLoader fork server (make_loader's set_forkserver_preload), never by anything else.

SIGTERM is the trainer's to handle (it finishes its step and saves), but schedulers send it to every process of
a job: a fork server killed by it makes PyTorch count its live workers as dead ("worker exited unexpectedly")
as soon as the trainer waits 5 s for a batch. So the fork server ignores SIGTERM (SIGINT it ignores by itself),
as do the workers it forks, which inherit the setting. It still ends with the trainer: when the last process
holding its "alive" pipe (the trainer, the workers) is gone. The check keeps an accidental import elsewhere
harmless: a fork server runs as `python -c CODE` with no further arguments.
"""

import signal
import sys

if sys.argv == ["-c"] and "multiprocessing.forkserver" in sys.modules:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
