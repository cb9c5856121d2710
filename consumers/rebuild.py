"""Rebuild a read model from the whole event store (see ``ReadModelStore.rebuild``)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from eventsourcing.application import Application

from consumers.direct import read_items
from projections.store import Item, Projection, ReadModelStore


def rebuild(app: Application[Any], store: ReadModelStore, projection: Projection,
            batch_size: int = 1000, progress: bool = False) -> int:
    total = app.recorder.max_notification_id() or 0

    def batches() -> Iterator[Sequence[Item]]:
        position = 0
        while True:
            items = read_items(app, position, batch_size)
            if not items:
                return
            position = items[-1].notification_id
            yield items
            if bar is not None:
                bar.update(task, completed=position)

    bar = None
    if progress:
        from rich.progress import Progress

        bar = Progress(transient=False)
        bar.start()
        task = bar.add_task(f"rebuilding {projection.name}", total=total)
    try:
        return store.rebuild(projection, batches())
    finally:
        if bar is not None:
            bar.stop()
