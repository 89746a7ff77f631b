"""``prefetch``: run an iterator in a daemon thread a few items ahead of its consumer.

Reads and writes nothing itself. Used by stage one (images ahead of the backbone,
:mod:`featcache.extract.run`) and by the fine-tuning head (activation blocks ahead of training,
:mod:`featcache.heads.finetune.data`).
"""

from __future__ import annotations

import queue
import threading
from typing import Iterator


def prefetch(it: Iterator, depth: int = 3, *, name: str = "featcache-reader") -> Iterator:
    """Yield ``it``'s items, produced by a daemon thread ``depth`` items ahead; its errors
    are re-raised here. The consumer waits in short slices, so Ctrl-C is seen at once, and
    closing the generator (or an error in the consumer) stops the thread."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    end = object()
    stop = threading.Event()

    def work():
        try:
            for item in it:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(end)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            q.put(exc)

    threading.Thread(target=work, daemon=True, name=name).start()
    try:
        while True:
            try:   # a timeout keeps the wait short, so Ctrl-C is seen at once
                item = q.get(timeout=0.2)
            except queue.Empty:
                continue
            if item is end:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
