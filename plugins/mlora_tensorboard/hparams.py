"""A job's hyper-parameters and status for TensorBoard's HParams dashboard.

Each job's run holds one ``SessionStartInfo`` (its hyper-parameters, written when the job
starts) and, when it ends, one ``SessionEndInfo`` (its status). No run holds an
``Experiment``: TensorBoard then builds it from every run that has a session start (the
union of their hyper-parameters, each column typed from its values) and takes as metrics
every scalar tag of those runs, valued by the tag's last point (see
``tensorboard/plugins/hparams/backend_context.py``). An ``Experiment`` would be read from one
run only, so jobs added to a running engine later would lack their columns.

The protos are built here rather than with ``torch.utils.tensorboard.summary.hparams``, which
writes all three at once, always with ``STATUS_SUCCESS``, and stores booleans as numbers.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

#: Job status (summary.json's ``status``) -> the session status TensorBoard shows. Statuses
#: not listed (a job stopped on purpose before its end: ``pruned``, ``cancelled``, ...) end
#: the session as ``STATUS_UNKNOWN``, neither a success nor a failure. ``interrupted`` is
#: absent on purpose: such a job continues with ``--resume``, and TensorBoard keeps the
#: first session end it reads, so none is written until the job really ends.
SESSION_STATUS = {"completed": api_pb2.STATUS_SUCCESS, "failed": api_pb2.STATUS_FAILURE}
#: Job statuses that leave the session open.
NOT_ENDED = {"interrupted", "running"}

HParam = bool | int | float | str


def job_hparams(job_config: Mapping[str, Any]) -> dict[str, HParam]:
    """A job's config as hyper-parameters: ``adapter.r``, ``train.lr``, ``objective.beta``, ...

    Nested sections become dotted names; lists of plain values are joined with commas
    (``adapter.target_modules`` = ``q_proj,v_proj``); ``null`` settings are left out (an empty
    cell: a ``None`` string would turn a numeric column into text). ``name`` is left out too:
    it names the run, which is the session.
    """
    flat: dict[str, HParam] = {}
    _flatten({k: v for k, v in job_config.items() if k != "name"}, "", flat)
    return flat


def _flatten(section: Mapping[str, Any], prefix: str, out: dict[str, HParam]) -> None:
    for key, value in section.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            _flatten(value, f"{name}.", out)
        elif isinstance(value, list | tuple):
            out[name] = ",".join(str(v) for v in value)
        elif isinstance(value, bool | int | float | str):
            out[name] = value
        elif value is not None:
            out[name] = str(value)


def session_start(hparams: Mapping[str, HParam], start_time_secs: float | None = None) -> Summary:
    """The summary that opens a job's session, with its hyper-parameters."""
    info = plugin_data_pb2.SessionStartInfo(start_time_secs=time.time() if start_time_secs is None else start_time_secs)
    for name, value in hparams.items():
        if isinstance(value, bool):  # before int: bool is an int
            info.hparams[name].bool_value = value
        elif isinstance(value, int | float):
            info.hparams[name].number_value = value
        else:
            info.hparams[name].string_value = value
    return _summary(metadata.SESSION_START_INFO_TAG, plugin_data_pb2.HParamsPluginData(session_start_info=info))


def session_end(status: str, end_time_secs: float | None = None) -> Summary | None:
    """The summary that closes a job's session, or None for a status that leaves it open."""
    if status in NOT_ENDED:
        return None
    info = plugin_data_pb2.SessionEndInfo(
        status=SESSION_STATUS.get(status, api_pb2.STATUS_UNKNOWN),
        end_time_secs=time.time() if end_time_secs is None else end_time_secs,
    )
    return _summary(metadata.SESSION_END_INFO_TAG, plugin_data_pb2.HParamsPluginData(session_end_info=info))


def _summary(tag: str, data: plugin_data_pb2.HParamsPluginData) -> Summary:
    summary = Summary()
    summary.value.add(tag=tag, metadata=metadata.create_summary_metadata(data), tensor=metadata.NULL_TENSOR)
    return summary
