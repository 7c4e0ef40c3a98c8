"""What the file routes take beyond access/deps.py's: the parts of the app's state the
files feature uses (`FilesDep`)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends

from exporter.access.deps import StateDep
from exporter.files.context import Files
from exporter.state import State


def files_of(st: State) -> Files:
    return Files(st.settings, st.engine, st.audit, st.limiter, st.read_budget,
                 st.files_store)


async def _files(st: StateDep) -> Files:
    return files_of(st)


FilesDep = Annotated[Files, Depends(_files)]
